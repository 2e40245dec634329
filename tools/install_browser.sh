#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver for the browser test of `evfsam-demo`
# (tests/deploy/test_demo.py). Idempotent; needs root on Debian/Ubuntu. Does nothing when both
# `chromium` and `chromedriver` are already on PATH. Never downloads a browser from elsewhere.
set -u

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser.sh: needs root (apt-get install chromium chromium-driver)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: apt-get not found; install chromium and chromium-driver by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
packages="chromium chromium-driver"

# Refresh the package lists only when apt does not know the packages yet (fresh CI images).
if ! apt-cache show chromium >/dev/null 2>&1 || ! apt-cache show chromium-driver >/dev/null 2>&1; then
    apt-get update -qq || { echo "install_browser.sh: apt-get update failed" >&2; exit 1; }
fi

# shellcheck disable=SC2086
if ! apt-get install -y -qq --no-install-recommends $packages >/dev/null; then
    echo "install_browser.sh: 'apt-get install $packages' failed" >&2
    exit 1
fi

if ! command -v chromedriver >/dev/null 2>&1; then
    echo "install_browser.sh: installed $packages but chromedriver is still not on PATH" >&2
    exit 1
fi
echo "install_browser.sh: installed $packages ($(chromedriver --version))"
