/**
 * Domain errors: one class per failure, each with a stable `code` and a message that says
 * what to change. The HTTP layer maps codes to statuses in exactly one place
 * (api/errors.ts); nothing here knows about HTTP.
 */
export class PodflareError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

export type ErrorCode =
  | "bad_request"
  | "unauthorized"
  | "forbidden"
  | "not_found"
  | "file_not_found"
  | "wrong_state"
  | "sandbox_dead"
  | "too_large"
  | "over_limit"
  | "too_many_streams"
  | "no_capacity"
  | "not_implemented"
  | "internal";

export class BadRequestError extends PodflareError {
  constructor(message: string) {
    super("bad_request", message);
  }
}

export class SandboxNotFoundError extends PodflareError {
  constructor(id: string) {
    super(
      "not_found",
      `sandbox ${JSON.stringify(id).slice(0, 80)} does not exist; list yours with GET /v1/sandboxes`,
    );
  }
}

export class FileNotFoundError extends PodflareError {
  constructor(path: string) {
    super("file_not_found", `no file at ${JSON.stringify(path).slice(0, 300)} in the sandbox`);
  }
}

export class WrongStateError extends PodflareError {
  constructor(id: string, state: string, operation: string) {
    super("wrong_state", `sandbox ${id} is ${state}; ${operation} needs a ready sandbox`);
  }
}

export class SandboxDeadError extends PodflareError {
  constructor(id: string, reason: string) {
    super("sandbox_dead", `sandbox ${id} is no longer running (${reason}); create a new one`);
  }
}

export class TooLargeError extends PodflareError {
  constructor(message: string) {
    super("too_large", message);
  }
}

export class OverLimitError extends PodflareError {
  constructor(message: string) {
    super("over_limit", message);
  }
}

/** Too many open streams, or too many bytes they hold unread (sandboxes/stream-budget.ts). */
export class TooManyStreamsError extends PodflareError {
  constructor(message: string) {
    super("too_many_streams", message);
  }
}

export class NoCapacityError extends PodflareError {
  constructor(message: string) {
    super("no_capacity", message);
  }
}

export class NotImplementedError extends PodflareError {
  constructor(message: string) {
    super("not_implemented", message);
  }
}
