/** Request schemas of the HTTP API (spec/openapi.yaml documents the same shapes). */
import { Type } from "@fastify/type-provider-typebox";

export const MAX_CODE_BYTES = 1024 * 1024;

export const SandboxIdParams = Type.Object({
  id: Type.String({ minLength: 1, maxLength: 128 }),
});

export const MergeParams = Type.Object({
  id: Type.String({ minLength: 1, maxLength: 128 }),
  winner: Type.String({ minLength: 1, maxLength: 128 }),
});

export const CreateBody = Type.Object({
  template: Type.Optional(Type.String({ minLength: 1, maxLength: 64 })),
  vcpu_count: Type.Optional(Type.Integer({ minimum: 1, maximum: 64 })),
  mem_size_mib: Type.Optional(Type.Integer({ minimum: 128, maximum: 1024 * 1024 })),
  timeout_ms: Type.Optional(Type.Integer({ minimum: 1 })),
  metadata: Type.Optional(
    // A Record's key schema becomes a pattern, which ignores maxLength: propertyNames
    // bounds the keys.
    Type.Record(Type.String(), Type.String({ maxLength: 1024 }), {
      maxProperties: 64,
      propertyNames: { minLength: 1, maxLength: 128 },
    }),
  ),
});

export const ExecBody = Type.Object({
  code: Type.String({ maxLength: MAX_CODE_BYTES }),
  language: Type.Optional(Type.Union([Type.Literal("python"), Type.Literal("bash")])),
  timeout_ms: Type.Optional(Type.Integer({ minimum: 1, maximum: 86_400_000 })),
});

export const ForkBody = Type.Object({
  n: Type.Optional(Type.Integer({ minimum: 1, maximum: 32 })),
});

export const FileQuery = Type.Object({
  path: Type.String({ maxLength: 8192 }),
});
