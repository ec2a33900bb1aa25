export type { DiffResult } from "./diff.js";
export * from "./errors.js";
export type { ConnectionOptions } from "./http.js";
export { DEFAULT_HOST } from "./http.js";
export type { ExecResult, RunCodeOptions, SandboxCreateOptions } from "./options.js";
export type { UploadData } from "./sandbox.js";
export { Sandbox } from "./sandbox.js";
export type {
  ErrorBody,
  ExecError,
  ExecEvent,
  ExecExitEvent,
  ExecOutputEvent,
  SandboxInfo,
} from "./wire.js";
