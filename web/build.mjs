// Builds the call page into server/static/call/: index.html, assets/call.js (livekit-client bundled),
// assets/call.css. Run through `npm run build` (deploy/build_web.sh).
import { build } from "esbuild";
import { copyFile, mkdir, rm, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "server", "static", "call");

await rm(out, { recursive: true, force: true });
await mkdir(join(out, "assets"), { recursive: true });
await build({
  entryPoints: [join(here, "src", "main.js")],
  outfile: join(out, "assets", "call.js"),
  bundle: true,
  format: "esm",
  target: ["es2020", "chrome100", "firefox100", "safari15"],
  minify: true,
  sourcemap: true,
  legalComments: "linked",
  logLevel: "info",
});
await copyFile(join(here, "src", "call.css"), join(out, "assets", "call.css"));
await copyFile(join(here, "index.html"), join(out, "index.html"));
// The output is built at install time, never committed (it bundles third-party code).
await writeFile(join(out, ".gitignore"), "*\n");
