/** The one place where errors become HTTP statuses and the contract's error body. */
import type { FastifyError } from "fastify";
import { type ErrorCode, PodflareError } from "../sandboxes/errors.js";
import { BootError } from "../vm/backend.js";

export const STATUS_BY_CODE: Readonly<Record<ErrorCode, number>> = {
  bad_request: 400,
  unauthorized: 401,
  forbidden: 403,
  not_found: 404,
  file_not_found: 404,
  wrong_state: 409,
  sandbox_dead: 409,
  too_large: 413,
  over_limit: 429,
  too_many_streams: 429,
  no_capacity: 503,
  not_implemented: 501,
  internal: 500,
};

export interface ErrorBody {
  error: string;
  code: string;
}

export function toHttpError(err: unknown): { status: number; body: ErrorBody } {
  if (err instanceof PodflareError) {
    return { status: STATUS_BY_CODE[err.code], body: { error: err.message, code: err.code } };
  }
  if (err instanceof BootError) {
    return {
      status: 503,
      body: { error: `could not start a VM: ${err.message.split("\n")[0]}`, code: "no_capacity" },
    };
  }
  const fe = err as Partial<FastifyError> & { validation?: unknown };
  if (fe.validation) {
    return { status: 400, body: { error: `invalid request: ${fe.message}`, code: "bad_request" } };
  }
  if (typeof fe.statusCode === "number" && fe.statusCode >= 400 && fe.statusCode < 500) {
    const code =
      fe.statusCode === 413 ? "too_large" : fe.statusCode === 404 ? "not_found" : "bad_request";
    return { status: fe.statusCode, body: { error: fe.message ?? "bad request", code } };
  }
  return {
    status: 500,
    body: { error: "internal error; the daemon log has the details", code: "internal" },
  };
}
