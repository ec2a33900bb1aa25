/**
 * One error class per failure; HTTP statuses map to them in `errorFromResponse` only.
 * Every message comes from the daemon and says what to change. The Python SDK
 * (python/podflare/errors.py) has the same classes under the same names, each with
 * `message`, `status` (null when no HTTP answer was had) and `code`.
 */
export class PodflareError extends Error {
  constructor(
    message: string,
    readonly status: number | null = null,
    readonly code: string = "error",
  ) {
    super(message);
    this.name = new.target.name;
  }
}
/** 400: the request is malformed or a value is out of range (also found before sending). */
export class InvalidArgumentError extends PodflareError {}
/**
 * 401: no API key, or a wrong one (set PODFLARE_API_KEY); 403: the daemon has no key and
 * this request did not address it by a loopback name (use http://127.0.0.1:7070).
 */
export class AuthenticationError extends PodflareError {}
/** 404: no such sandbox (or not yours), or no such file. */
export class NotFoundError extends PodflareError {}
/** 409: the sandbox is not in a state that allows the operation (e.g. it died). */
export class SandboxStateError extends PodflareError {}
/** 413: an upload over the daemon's limit. */
export class PayloadTooLargeError extends PodflareError {}
/** 429: over a limit (sandbox count, quota). */
export class RateLimitError extends PodflareError {}
/** 501: the daemon does not implement this operation yet. */
export class NotImplementedByDaemonError extends PodflareError {}
/** The former name of NotImplementedByDaemonError, kept for existing callers. */
export const NotImplementedError = NotImplementedByDaemonError;
export type NotImplementedError = NotImplementedByDaemonError;
/** 503: the host has no capacity right now; retry later. */
export class CapacityError extends PodflareError {}
/** 5xx: a bug in the daemon; its log has details. */
export class ServerError extends PodflareError {}
/**
 * The daemon could not be reached, or the connection was cut before its answer ended
 * (an exec stream that ends without its exit event).
 */
export class ConnectionError extends PodflareError {}
/** The daemon sent nothing for longer than the client waits (a kind of ConnectionError). */
export class TimeoutError extends ConnectionError {}

const BY_STATUS: Record<number, new (m: string, s: number, c: string) => PodflareError> = {
  400: InvalidArgumentError,
  401: AuthenticationError,
  403: AuthenticationError,
  404: NotFoundError,
  409: SandboxStateError,
  413: PayloadTooLargeError,
  429: RateLimitError,
  501: NotImplementedByDaemonError,
  503: CapacityError,
};

export function errorFromResponse(status: number, bodyText: string): PodflareError {
  let message = bodyText.slice(0, 2000) || `HTTP ${status}`;
  let code = "error";
  try {
    const body = JSON.parse(bodyText) as { error?: unknown; code?: unknown };
    if (typeof body.error === "string") message = body.error;
    if (typeof body.code === "string") code = body.code;
  } catch {}
  const Cls = BY_STATUS[status] ?? (status >= 500 ? ServerError : PodflareError);
  return new Cls(message, status, code);
}
