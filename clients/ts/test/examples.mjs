// The README examples, compiled and run, so they cannot rot: every ```ts block of
// clients/ts/README.md and of the repository's README.md is written into this package
// (test/.examples/, where `supersynk-reliable` resolves to the package itself), compiled with
// tsc against the built package (strict), and run with node against a real server (its
// `ws://localhost:5001` replaced by the test server's address). Each must exit 0 within
// 30 s, and print exactly what the ```output block right after it says (nothing, if there
// is none).
//   node test/examples.mjs        (after npm run build; scripts/ts-test.sh runs it)
import { execFile } from "node:child_process";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import assert from "node:assert/strict";

import { startServer } from "./helpers.mjs";

const run = promisify(execFile);
const pkg = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const root = path.resolve(pkg, "../..");
const out = path.join(pkg, "test/.examples");

/** The fenced blocks of a markdown file: { info, body, line }, indented fences included. */
function blocks(file) {
  const lines = readFileSync(file, "utf8").split("\n");
  const found = [];
  let open = null;
  lines.forEach((line, i) => {
    const m = /^(\s*)```(.*)$/.exec(line);
    if (m && !open) {
      open = { indent: m[1].length, info: m[2].trim(), body: [], line: i + 1 };
    } else if (m && open) {
      found.push({ info: open.info, body: open.body.join("\n") + "\n", line: open.line });
      open = null;
    } else if (open) {
      open.body.push(line.slice(Math.min(open.indent, line.length - line.trimStart().length)));
    }
  });
  return found;
}

/** Every ts example with the output that follows it. */
function examples(file) {
  const all = blocks(file);
  const list = [];
  all.forEach((b, i) => {
    if (b.info !== "ts") return;
    const next = all[i + 1];
    list.push({
      where: `${path.relative(root, file)}:${b.line}`,
      code: b.body,
      output: next?.info === "output" ? next.body : "",
    });
  });
  return list;
}

const list = [...examples(path.join(pkg, "README.md")), ...examples(path.join(root, "README.md"))];
assert.ok(list.length >= 6, `only ${list.length} examples found`);

const server = await startServer();
let failed = 0;
try {
  rmSync(out, { recursive: true, force: true });
  mkdirSync(out, { recursive: true });
  const files = list.map((ex, i) => {
    const name = `example${i + 1}.ts`;
    const code = ex.code.replaceAll("ws://localhost:5001", `ws://${server.addr}`);
    writeFileSync(path.join(out, name), `// ${ex.where}\n${code}`);
    return name;
  });
  writeFileSync(
    path.join(out, "tsconfig.json"),
    JSON.stringify({
      compilerOptions: {
        target: "ES2022",
        module: "NodeNext",
        moduleResolution: "NodeNext",
        lib: ["ES2022"],
        types: ["node"],
        strict: true,
        skipLibCheck: false,
        rootDir: ".",
        outDir: "js",
      },
      files,
    }),
  );
  try {
    await run(path.join(pkg, "node_modules/.bin/tsc"), ["-p", path.join(out, "tsconfig.json")]);
  } catch (e) {
    throw new Error(`the examples do not compile:\n${e.stdout}${e.stderr}`);
  }
  for (const [i, ex] of list.entries()) {
    const js = path.join(out, "js", `example${i + 1}.js`);
    try {
      const { stdout } = await run(process.execPath, [js], { timeout: 30000 });
      assert.equal(stdout, ex.output, `${ex.where}: printed\n${stdout}\ninstead of\n${ex.output}`);
      console.log(`ok ${ex.where}`);
    } catch (e) {
      failed++;
      console.error(`FAILED ${ex.where}: ${e.killed ? "did not exit within 30 s" : e.message}\n${e.stderr ?? ""}`);
    }
  }
} finally {
  await server.stop();
}
console.log(`README examples: ${list.length - failed} of ${list.length} ok`);
process.exit(failed ? 1 : 0);
