import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { Authenticator } from "../auth/authenticator.js";
import {
  BadRequestError,
  IllegalTransitionError,
  SandboxPausedError,
  VmStartError,
  WrongStateError,
} from "../sandboxes/errors.js";
import type { SandboxService } from "../sandboxes/service.js";
import { silentLogger } from "../util/logger.js";
import { clientErrorResponse, STATUS_BY_CODE, toHttpError } from "./errors.js";
import { buildServer } from "./server.js";

describe("toHttpError", () => {
  it("maps domain errors by code, with the contract's body", () => {
    assert.deepEqual(toHttpError(new BadRequestError("no")), {
      status: 400,
      body: { error: "no", code: "bad_request" },
    });
    assert.equal(toHttpError(new WrongStateError("sbx_1", "creating", "exec")).status, 409);
    assert.equal(toHttpError(new IllegalTransitionError("sbx_1", "ended", "ready")).status, 500);
    assert.equal(toHttpError(new SandboxPausedError("sbx_1")).status, 503);
    assert.deepEqual(toHttpError(new VmStartError("QEMU exited during boot.\ndetails")), {
      status: 503,
      body: { error: "could not start a VM: QEMU exited during boot.", code: "no_capacity" },
    });
    assert.equal(STATUS_BY_CODE.not_implemented, 501);
  });

  it("hides an unknown error behind a 500", () => {
    assert.deepEqual(toHttpError(new Error("secret")), {
      status: 500,
      body: { error: "internal error; the daemon log has the details", code: "internal" },
    });
  });

  it("writes a whole raw answer for a request Node cannot parse", () => {
    const text = clientErrorResponse("HPE_HEADER_OVERFLOW", {
      headersTimeoutMs: 1,
      requestTimeoutMs: 2,
    });
    const body = '{"error":"the request headers are too large","code":"too_large"}';
    assert.equal(
      text,
      `HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\nconnection: close\r\n\r\n${body}`,
    );
    assert.match(
      clientErrorResponse("ERR_HTTP_REQUEST_TIMEOUT", { headersTimeoutMs: 5, requestTimeoutMs: 6 }),
      /^HTTP\/1\.1 408 Request Timeout\r\n.*headers within 5 ms, the whole request within 6 ms/s,
    );
    assert.match(
      clientErrorResponse("HPE_INVALID_METHOD", { headersTimeoutMs: 5, requestTimeoutMs: 6 }),
      /^HTTP\/1\.1 400 Bad Request\r\n/,
    );
  });
});

describe("the server's framework-level error answers", () => {
  const app = buildServer({
    service: {} as SandboxService, // no route reaches the service here
    auth: new Authenticator(null, ["pf_test_key_0123456789abcdef"]),
    capacity: async () => ({}),
    log: silentLogger(),
  });
  const auth = { authorization: "Bearer pf_test_key_0123456789abcdef" };

  it("answers an unknown route, a bad body, a failed validation and no key as before", async () => {
    const noRoute = await app.inject({ method: "GET", url: "/v1/nope?x=1", headers: auth });
    assert.equal(noRoute.statusCode, 404);
    assert.equal(noRoute.body, '{"error":"no route GET /v1/nope","code":"not_found"}');

    const create = (payload: string) =>
      app.inject({
        method: "POST",
        url: "/v1/sandboxes",
        headers: { ...auth, "content-type": "application/json" },
        payload,
      });
    const badJson = await create("{");
    assert.equal(badJson.statusCode, 400);
    assert.equal(JSON.parse(badJson.body).code, "bad_request");

    const invalid = await create('{"vcpu_count":0}');
    assert.equal(invalid.statusCode, 400);
    assert.equal(
      invalid.body,
      '{"error":"invalid request: body/vcpu_count must be >= 1","code":"bad_request"}',
    );

    const noKey = await app.inject({ method: "GET", url: "/v1/sandboxes" });
    assert.equal(noKey.statusCode, 401);
    assert.equal(JSON.parse(noKey.body).code, "unauthorized");
    assert.equal(noKey.headers.connection, "close");
    await app.close();
  });
});
