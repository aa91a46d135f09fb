#!/usr/bin/env bash
# Builds the desktop app's .deb with the Tauri CLI (npm, pinned in ui/package-lock.json).
# The CLI wants tauri.conf.json beside the app's Cargo.toml; ours lives at the top of the repository
# (beside ui/ and icons/), so this writes a copy with its paths rebased into src-tauri/ for the run.
set -euo pipefail
cd "$(dirname "$0")/.."
npm ci --prefix ui --no-audit --no-fund --loglevel=error
npm run --prefix ui --silent build
node -e '
const fs = require("fs");
const c = JSON.parse(fs.readFileSync("tauri.conf.json", "utf8"));
c.build.frontendDist = "../" + c.build.frontendDist;
c.bundle.icon = c.bundle.icon.map((p) => "../" + p);
const files = c.bundle.linux.deb.files || {};
for (const k of Object.keys(files)) files[k] = "../" + files[k];
fs.writeFileSync("src-tauri/tauri.conf.json", JSON.stringify(c, null, 2));
'
trap 'rm -f src-tauri/tauri.conf.json' EXIT
(cd src-tauri && ../ui/node_modules/.bin/tauri build --bundles "${1:-deb}")
ls -l target/release/bundle/*/
