"""`evfsam-demo`: started as users start it and driven in a real headless Chromium (selenium +
Debian's chromium / chromium-driver, installed by tools/install_browser.sh)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from tests.conftest import REPO

ARTIFACTS = REPO / "test-artifacts"


def test_expressions_one_per_line_and_semantic_prefix():
    from evfsam_lightning.deploy.demo import expressions

    assert expressions("the man\n\n  the red car \n", False) == ["the man", "the red car"]
    assert expressions("sky\n[semantic] wall", True) == ["[semantic] sky", "[semantic] wall"]


def test_missing_checkpoint_exits_2(tmp_path):
    pytest.importorskip("gradio", reason="demo extra not installed: pip install -e '.[demo]'")
    r = subprocess.run([sys.executable, "-m", "evfsam_lightning.cli.demo", "--checkpoint", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert "no such file or directory" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("evfsam-demo: error: --checkpoint "), r.stderr


def _browser_or_skip() -> tuple[str, str]:
    pytest.importorskip("gradio", reason="demo extra not installed: pip install -e '.[demo]'")
    pytest.importorskip("selenium", reason="selenium not installed (dev extra)")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no headless browser: chromium and chromedriver not on PATH (bash tools/install_browser.sh)")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"evfsam-demo exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"evfsam-demo did not serve {url} within {timeout}s")


@pytest.fixture
def browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or the test is skipped with the reason."""
    return _browser_or_skip()


@pytest.fixture
def demo_server(browser, tmp_path, tiny_tokenizer_dir):
    from evfsam_lightning.models.builders import build_model
    from evfsam_lightning.models.checkpoints import export_reference

    torch.manual_seed(0)
    folder = export_reference(build_model("tiny"), tmp_path / "model", tokenizer_dir=tiny_tokenizer_dir)
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO),
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    proc = subprocess.Popen([sys.executable, "-m", "evfsam_lightning.cli.demo", "--checkpoint", str(folder),
                             "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_http(url, proc, timeout=300)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_demo_in_headless_chromium(browser, demo_server, tmp_path):
    chromium, chromedriver = browser
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = np.full((90, 120, 3), 235, dtype=np.uint8)
    image[20:70, 30:80] = (210, 30, 30)
    image_path = tmp_path / "upload.png"
    Image.fromarray(image).save(image_path)

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1100", f"--user-data-dir={tmp_path / 'chrome'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "evfsam-demo.png"
    try:
        wait = WebDriverWait(driver, 240)
        driver.get(demo_server)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        upload.send_keys(str(image_path))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
        box = driver.find_element(By.CSS_SELECTOR, "#expressions textarea")
        box.send_keys("the red square\nthe background")
        driver.find_element(By.CSS_SELECTOR, "#semantic input[type=checkbox]").click()
        driver.find_element(By.CSS_SELECTOR, "#segment").click()
        result = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#overlay img[src]")))
        links = wait.until(lambda d: (lambda a: a if len(a) == 2 else False)(
            d.find_elements(By.CSS_SELECTOR, "#downloads a[href]")))
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#legend"), "[semantic] the background"))
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")

        # The overlay is an image of the upload's size; the downloads are binary masks of that size.
        with urllib.request.urlopen(result.get_attribute("src"), timeout=30) as r:
            overlay = np.asarray(Image.open(r).convert("RGB"))
        assert overlay.shape == image.shape
        names = sorted(a.get_attribute("href").rsplit("/", 1)[-1] for a in links)
        assert names[0].startswith("mask_00_semantic_the_red_square") and names[1].startswith("mask_01_"), names
        with urllib.request.urlopen(links[0].get_attribute("href"), timeout=30) as r:
            mask = np.asarray(Image.open(r))
        assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}

        # The page needed nothing from outside this machine (no CDN, fonts or analytics).
        requested = set()
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                requested.add(message["params"]["request"]["url"])
        outside = sorted(u for u in requested if u.startswith(("http:", "https:", "ws:", "wss:"))
                         and not u.startswith(demo_server.rstrip("/")))
        assert not outside, outside

        # Pick the example image instead: its expressions replace the typed ones.
        driver.find_element(By.XPATH, "//*[normalize-space(text())='the red circle the blue square']").click()
        wait.until(lambda d: "the red circle" in box.get_attribute("value"))
        driver.find_element(By.CSS_SELECTOR, "#segment").click()
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#legend"), "[semantic] the blue square"))
        driver.save_screenshot(str(ARTIFACTS / "evfsam-demo-example.png"))
    except Exception:
        driver.save_screenshot(str(shot))
        print(f"screenshot (failure): {shot}")
        raise
    finally:
        driver.quit()
