import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { describe, it } from "node:test";
import { isStaticElf } from "./build.js";

describe("image build checks", () => {
  it("tells a static binary from a dynamic one", async () => {
    assert.equal(
      isStaticElf(await readFile(process.execPath)),
      false,
      "node is dynamically linked",
    );
    const busybox = await readFile("/bin/busybox").catch(() => null);
    if (busybox) assert.equal(isStaticElf(busybox), true, "/bin/busybox from busybox-static");
    assert.equal(isStaticElf(Buffer.from("#!/bin/sh\n")), false);
  });
});
