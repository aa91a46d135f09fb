// Builds dist/ for Tauri: our page, script and styles, and the NHS.UK frontend stylesheet and images
// from node_modules. Remote web fonts are cut out of the stylesheet: the app fetches nothing at run time.
import { cpSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
const nhsuk = join(here, "node_modules", "nhsuk-frontend", "dist", "nhsuk");

rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });
for (const file of ["index.html", "app.js", "app.css"]) {
  cpSync(join(here, file), join(dist, file));
}
let css = readFileSync(join(nhsuk, "nhsuk-frontend.min.css"), "utf8");
const before = css.length;
css = css.replace(/@font-face\{[^}]*\}/g, "");
if (/url\(["']?https?:/.test(css)) {
  throw new Error("the NHS.UK stylesheet still points at a remote URL after removing @font-face");
}
writeFileSync(join(dist, "nhsuk-frontend.min.css"), css);
cpSync(join(nhsuk, "assets"), join(dist, "assets"), { recursive: true });
console.log(`ui/dist built (${before - css.length} bytes of remote font rules removed)`);
