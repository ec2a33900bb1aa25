/**
 * The one place where errors become HTTP statuses and the contract's error body
 * (`{error, code}`): domain errors by their code, Fastify's own (validation, body
 * parsing, routing), requests refused at the door, and requests Node cannot parse.
 * server.ts only wires these in.
 */
import type { FastifyError } from "fastify";
import { type ErrorCode, PodflareError } from "../sandboxes/errors.js";

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
  code: ErrorCode;
}

export interface HttpError {
  status: number;
  body: ErrorBody;
}

/** An error answer with the status its code maps to. */
export function httpError(code: ErrorCode, message: string): HttpError {
  return { status: STATUS_BY_CODE[code], body: { error: message, code } };
}

/** Whatever a route handler (or Fastify around it) threw. */
export function toHttpError(err: unknown): HttpError {
  if (err instanceof PodflareError) return httpError(err.code, err.message);
  const fe = err as Partial<FastifyError> & { validation?: unknown };
  if (fe.validation) return httpError("bad_request", `invalid request: ${fe.message}`);
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

/** An error Fastify meets before routing (a malformed %-escape). */
export function frameworkError(err: Error): HttpError {
  return httpError("bad_request", `invalid request: ${err.message}`);
}

/** No route matches. */
export function routeNotFound(method: string, url: string): HttpError {
  return httpError("not_found", `no route ${method} ${url.split("?")[0]}`);
}

/** The timeouts the 408 answer names (api/server.ts HttpLimits). */
export interface RequestTimeouts {
  headersTimeoutMs: number;
  requestTimeoutMs: number;
}

/**
 * A request Node could not parse at all (its error's `code`): the whole raw HTTP/1.1
 * response, in the contract's shape, that closes the connection.
 */
export function clientErrorResponse(code: string | undefined, timeouts: RequestTimeouts): string {
  const [status, body] =
    code === "HPE_HEADER_OVERFLOW"
      ? [
          "431 Request Header Fields Too Large",
          { error: "the request headers are too large", code: "too_large" },
        ]
      : code === "ERR_HTTP_REQUEST_TIMEOUT"
        ? [
            "408 Request Timeout",
            {
              error: `the request did not arrive in time (headers within ${timeouts.headersTimeoutMs} ms, the whole request within ${timeouts.requestTimeoutMs} ms: PODFLARE_HTTP_HEADERS_TIMEOUT_MS, PODFLARE_HTTP_REQUEST_TIMEOUT_MS)`,
              code: "bad_request",
            },
          ]
        : [
            "400 Bad Request",
            { error: "the request could not be parsed as HTTP/1.1", code: "bad_request" },
          ];
  const text = JSON.stringify(body);
  return `HTTP/1.1 ${status}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(text)}\r\nconnection: close\r\n\r\n${text}`;
}
