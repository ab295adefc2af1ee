#!/usr/bin/env bash
# Headless Chromium for the browser tests (tests/test_report_html.py, tests/test_review.py), with its
# WebDriver (chromium-driver, for Selenium): Debian's packages, installed only when missing (as root,
# or with sudo). Prints one line either way; never fails the caller: the tests themselves fail under
# CI=true when no browser is there.
if { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 && SUDO="sudo -n" || { echo "ensure_chromium: chromium missing and not root (apt-get install chromium)" >&2; exit 0; }
fi
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; then
  echo "ensure_chromium: installed $(chromium --version 2>/dev/null)" >&2
else
  echo "ensure_chromium: could not install Debian's chromium package" >&2
fi
exit 0
