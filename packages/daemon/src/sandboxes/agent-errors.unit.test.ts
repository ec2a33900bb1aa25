import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { AgentClosedError, AgentError } from "../guest/agent-client.js";
import { mapAgentError } from "./agent-errors.js";
import {
  BadRequestError,
  FileNotFoundError,
  type PodflareError,
  SandboxDeadError,
  TooLargeError,
} from "./errors.js";

const map = (code: string, message: string) =>
  mapAgentError(new AgentError(code, message), "sbx_1", "/root/x") as PodflareError;

describe("mapAgentError", () => {
  it("maps not_a_file to a 400 that asks for a regular file", () => {
    const err = map("not_a_file", "/dev/null is not a regular file");
    assert.ok(err instanceof BadRequestError);
    assert.equal(err.message, "/dev/null is not a regular file; give the path of a regular file");
  });

  it("maps no_space to a 413 that says the sandbox's disk is full", () => {
    const err = map("no_space", "[Errno 28] No space left on device");
    assert.ok(err instanceof TooLargeError);
    assert.equal(
      err.message,
      "the sandbox's disk is full ([Errno 28] No space left on device); delete files in it or upload less",
    );
  });

  it("keeps any other io_error internal, whatever its message says", () => {
    for (const message of ["/x is not a regular file", "No space left on device", "EIO"]) {
      const err = map("io_error", message);
      assert.equal(err.code, "internal");
      assert.equal(err.message, `the sandbox could not complete the file operation: ${message}`);
    }
  });

  it("maps the other codes by code", () => {
    assert.ok(map("not_found", "gone") instanceof FileNotFoundError);
    assert.equal(
      map("is_directory", "d").message,
      "/root/x is a directory in the sandbox; give a file path",
    );
    assert.equal(map("bad_path", "bad").code, "bad_request");
    assert.equal(map("bad_request", "bad").code, "bad_request");
    assert.equal(map("too_large", "big").code, "too_large");
    const closed = mapAgentError(new AgentClosedError("closed"), "sbx_1");
    assert.ok(closed instanceof SandboxDeadError);
  });

  it("passes domain errors and unknown errors through", () => {
    const domain = new BadRequestError("no");
    assert.equal(mapAgentError(domain, "sbx_1"), domain);
    const other = new Error("other");
    assert.equal(mapAgentError(other, "sbx_1"), other);
  });
});
