/** Request schemas of the HTTP API (spec/openapi.yaml documents the same shapes). */
import { Type } from "@fastify/type-provider-typebox";
import {
  MAX_CODE_BYTES,
  MAX_EXEC_TIMEOUT_MS,
  MAX_FORK_CHILDREN,
  MAX_ID_LENGTH,
  MAX_METADATA_ENTRIES,
  MAX_METADATA_KEY_LENGTH,
  MAX_METADATA_VALUE_LENGTH,
  MAX_PATH_QUERY_LENGTH,
  MAX_TEMPLATE_NAME_LENGTH,
  MIN_MEM_SIZE_MIB,
  SCHEMA_MAX_MEM_SIZE_MIB,
  SCHEMA_MAX_VCPU_COUNT,
} from "../sandboxes/limits.js";

const SandboxId = () => Type.String({ minLength: 1, maxLength: MAX_ID_LENGTH });

export const SandboxIdParams = Type.Object({
  id: SandboxId(),
});

export const MergeParams = Type.Object({
  id: SandboxId(),
  winner: SandboxId(),
});

export const CreateBody = Type.Object({
  template: Type.Optional(Type.String({ minLength: 1, maxLength: MAX_TEMPLATE_NAME_LENGTH })),
  vcpu_count: Type.Optional(Type.Integer({ minimum: 1, maximum: SCHEMA_MAX_VCPU_COUNT })),
  mem_size_mib: Type.Optional(
    Type.Integer({ minimum: MIN_MEM_SIZE_MIB, maximum: SCHEMA_MAX_MEM_SIZE_MIB }),
  ),
  timeout_ms: Type.Optional(Type.Integer({ minimum: 1 })),
  metadata: Type.Optional(
    // A Record's key schema becomes a pattern, which ignores maxLength: propertyNames
    // bounds the keys.
    Type.Record(Type.String(), Type.String({ maxLength: MAX_METADATA_VALUE_LENGTH }), {
      maxProperties: MAX_METADATA_ENTRIES,
      propertyNames: { minLength: 1, maxLength: MAX_METADATA_KEY_LENGTH },
    }),
  ),
});

export const ExecBody = Type.Object({
  code: Type.String({ maxLength: MAX_CODE_BYTES }),
  language: Type.Optional(Type.Union([Type.Literal("python"), Type.Literal("bash")])),
  timeout_ms: Type.Optional(Type.Integer({ minimum: 1, maximum: MAX_EXEC_TIMEOUT_MS })),
});

export const ForkBody = Type.Object({
  n: Type.Optional(Type.Integer({ minimum: 1, maximum: MAX_FORK_CHILDREN })),
});

export const FileQuery = Type.Object({
  path: Type.String({ maxLength: MAX_PATH_QUERY_LENGTH }),
});
