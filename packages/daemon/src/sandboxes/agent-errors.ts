/**
 * The guest agent's errors as domain errors, by the agent's protocol code (never by the
 * text of its message): what the caller gets when the guest refuses or fails a call.
 */
import { AgentClosedError, AgentError } from "../guest/agent-client.js";
import {
  BadRequestError,
  FileNotFoundError,
  PodflareError,
  SandboxDeadError,
  TooLargeError,
} from "./errors.js";

export function mapAgentError(err: unknown, id: string, path?: string): Error {
  if (err instanceof PodflareError) return err;
  if (err instanceof AgentClosedError) return new SandboxDeadError(id, "its agent channel closed");
  if (err instanceof AgentError) {
    switch (err.code) {
      case "not_found":
        return new FileNotFoundError(path ?? "");
      case "is_directory":
        return new BadRequestError(`${path} is a directory in the sandbox; give a file path`);
      case "not_a_file":
        return new BadRequestError(`${err.message}; give the path of a regular file`);
      case "bad_path":
      case "bad_request":
        return new BadRequestError(err.message);
      case "too_large":
        return new TooLargeError(err.message);
      case "no_space":
        return new TooLargeError(
          `the sandbox's disk is full (${err.message}); delete files in it or upload less`,
        );
      case "io_error":
        return new PodflareError(
          "internal",
          `the sandbox could not complete the file operation: ${err.message}`,
        );
    }
  }
  return err as Error;
}
