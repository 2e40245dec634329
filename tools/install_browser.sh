#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver for the browser test of `evfsam-demo`
# (tests/deploy/test_demo.py). Idempotent; needs root on Debian/Ubuntu. Does nothing when both
# `chromium` and `chromedriver` are already on PATH. Never downloads a browser from elsewhere.
exec bash "$(dirname "$0")/apt_install.sh" install_browser.sh "chromium chromedriver" "chromium chromium-driver" \
    "chromedriver --version"
