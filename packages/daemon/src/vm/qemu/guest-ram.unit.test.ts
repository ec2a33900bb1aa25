/**
 * guest-ram.ts on real processes (no VM): two Python processes map one file privately, as
 * QEMU maps a template; the pages one of them changed are found, read and written into
 * the other, which then holds the same bytes, while the file stays as it was.
 */
import assert from "node:assert/strict";
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { after, before, describe, it } from "node:test";
import {
  capturePrivatePages,
  PAGE,
  ramAddress,
  ramSource,
  readPages,
  scanPrivatePages,
  writePages,
} from "./guest-ram.js";
import { finish } from "./page-stream.js";

const PAGES = 64;
const MAPPER = `
import hashlib, mmap, sys
f = open(sys.argv[1], "r+b")
m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
if sys.argv[2] == "dirty":
    m[3 * 4096:5 * 4096] = b"x" * 8192
    m[10 * 4096] = 0x42
    m[63 * 4096 + 17] = 0x43
print("ready", flush=True)
for line in sys.stdin:
    print(hashlib.sha256(m[:]).hexdigest(), flush=True)
`;

interface Mapper {
  child: ChildProcessWithoutNullStreams;
  next(): Promise<string>;
}

async function mapper(path: string, mode: "dirty" | "clean"): Promise<Mapper> {
  const child = spawn("python3", ["-c", MAPPER, path, mode]);
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  const next = async () => String((await lines.next()).value);
  assert.equal(await next(), "ready");
  return { child, next };
}

async function hashOf(m: Mapper): Promise<string> {
  m.child.stdin.write("hash\n");
  return m.next();
}

describe("guest RAM pages", () => {
  let dir: string;
  let path: string;
  const mappers: Mapper[] = [];
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "guest-ram-"));
    path = join(dir, "mem");
    const data = Buffer.alloc(PAGES * PAGE);
    for (let i = 0; i < PAGES; i++) data.fill(i, i * PAGE, (i + 1) * PAGE);
    await writeFile(path, data);
  });
  after(async () => {
    for (const m of mappers) m.child.kill();
    await rm(dir, { recursive: true, force: true });
  });

  it("finds a process's private pages and gives them to another mapping of the file", async () => {
    const a = await mapper(path, "dirty");
    const b = await mapper(path, "clean");
    mappers.push(a, b);
    const source = ramSource({ path }, PAGES * PAGE);
    const pidA = a.child.pid as number;
    const pidB = b.child.pid as number;
    const pages = await capturePrivatePages(pidA, ramAddress(pidA, source), source.bytes);
    assert.deepEqual(pages.runs, [
      { offset: 3 * PAGE, length: 2 * PAGE },
      { offset: 10 * PAGE, length: PAGE },
      { offset: 63 * PAGE, length: PAGE },
    ]);
    assert.equal(pages.data.length, 4 * PAGE);
    assert.equal(pages.data[0], "x".charCodeAt(0));
    assert.notEqual(await hashOf(a), await hashOf(b));
    await writePages(pidB, ramAddress(pidB, source), pages);
    assert.equal(await hashOf(b), await hashOf(a), "b holds a's bytes");
    const file = await readFile(path);
    assert.equal(file[3 * PAGE], 3, "the file itself is unchanged");
    assert.equal(file[10 * PAGE], 10);
  });

  it("a write started before the read follows it and ends with the same bytes", async () => {
    const a = await mapper(path, "dirty");
    const b = await mapper(path, "clean");
    mappers.push(a, b);
    const source = ramSource({ path }, PAGES * PAGE);
    const pidA = a.child.pid as number;
    const pidB = b.child.pid as number;
    const pages = scanPrivatePages(pidA, ramAddress(pidA, source), source.bytes);
    assert.equal(pages.data.length, 4 * PAGE);
    // The writer waits for the reader: nothing is read yet.
    const written = writePages(pidB, ramAddress(pidB, source), pages);
    let done = false;
    void written.then(() => {
      done = true;
    });
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(done, false, "the write waits for pages not read yet");
    await readPages(pidA, ramAddress(pidA, source), pages);
    assert.equal(typeof (await written), "number");
    assert.equal(await hashOf(b), await hashOf(a), "b holds a's bytes");
  });

  it("a write whose read fails is refused", async () => {
    const b = await mapper(path, "clean");
    mappers.push(b);
    const a = await mapper(path, "dirty");
    mappers.push(a);
    const source = ramSource({ path }, PAGES * PAGE);
    const pidA = a.child.pid as number;
    const pidB = b.child.pid as number;
    const pages = scanPrivatePages(pidA, ramAddress(pidA, source), source.bytes);
    const written = writePages(pidB, ramAddress(pidB, source), pages);
    finish(pages.progress, false); // the reader gave up (the parent died, say)
    await assert.rejects(written, /could not be read/);
  });

  it("refuses a process that does not map the file", () => {
    const source = ramSource({ path }, PAGES * PAGE);
    assert.throws(() => ramAddress(process.pid, source), /no mapping of its guest RAM/);
  });
});
