export { Sandbox } from "./sandbox.js";
export type { ExecEvent, ExecError, ExecResult, RunCodeOptions, SandboxCreateOptions, SandboxInfo, UploadData } from "./sandbox.js";
export type { ConnectionOptions } from "./http.js";
export { DEFAULT_HOST } from "./http.js";
export * from "./errors.js";
