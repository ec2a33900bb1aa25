/**
 * Domain errors: one class per failure, each with a stable `code` and a message that says
 * what to change. The HTTP layer maps codes to statuses in exactly one place
 * (api/errors.ts); nothing here knows about HTTP. The `not_implemented` code is the
 * contract's (spec/openapi.yaml) though nothing raises it today.
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

/** A caller's operation on a sandbox that is not ready (409). */
export class WrongStateError extends PodflareError {
  constructor(
    readonly sandboxId: string,
    readonly state: string,
    readonly operation: string,
  ) {
    super("wrong_state", `sandbox ${sandboxId} is ${state}; ${operation} needs a ready sandbox`);
  }
}

/**
 * A state change the lifecycle table (sandboxes/lifecycle.ts) forbids: a bug in the
 * daemon, never the caller's doing (500).
 */
export class IllegalTransitionError extends PodflareError {
  constructor(
    readonly sandboxId: string,
    readonly from: string,
    readonly to: string,
  ) {
    super("internal", `illegal sandbox transition ${from} -> ${to} for ${sandboxId}`);
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

/** A call on a sandbox its VM paused on a full host disk (sandboxes/disk-guard.ts). */
export class SandboxPausedError extends NoCapacityError {
  constructor(id: string) {
    super(
      `sandbox ${id} is paused because the host's disk is full; its memory and files are kept and it resumes by itself once disk space is freed on the host`,
    );
  }
}

/** A VM that could not be started (the engine's BootError, translated in host-errors.ts). */
export class VmStartError extends NoCapacityError {
  constructor(detail: string) {
    super(`could not start a VM: ${detail.split("\n")[0]}`);
  }
}
