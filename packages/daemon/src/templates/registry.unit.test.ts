import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { recipeKey, rootTreeKey } from "../image/recipe.js";
import { BadRequestError } from "../sandboxes/errors.js";
import { defaultTemplate } from "./default.js";
import { DEFAULT_TEMPLATE, TEMPLATES, templateNames, templateSpec } from "./registry.js";

describe("template registry", () => {
  it("holds the default template, found by name", () => {
    assert.equal(DEFAULT_TEMPLATE, "default");
    assert.deepEqual(templateNames(), ["default"]);
    assert.equal(templateSpec("default"), defaultTemplate);
    assert.deepEqual(defaultTemplate.defaultShape, { vcpuCount: 2, memSizeMib: 1024 });
  });

  it("an unknown name is a 400 that lists the known ones", () => {
    assert.throws(
      () => templateSpec("nope"),
      (e) =>
        e instanceof BadRequestError &&
        /unknown template "nope"; available: default$/.test(e.message),
    );
  });

  it("names are unique", () => {
    assert.equal(new Set(templateNames()).size, TEMPLATES.length);
  });

  it("the default image keeps its hash (its packages, in their order)", async () => {
    // Computed by the code before templates had specs (main at f7b716f): CI caches stay valid.
    assert.equal(rootTreeKey(defaultTemplate.packages), "d86faf88c5f49324");
    const kernel = { name: "linux-image-6.1.0-99-cloud-amd64", version: "6.1.999-1" };
    const guest = new URL("../../../../guest", import.meta.url).pathname;
    const other = await recipeKey(guest, kernel, [...defaultTemplate.packages, "git"]);
    assert.notEqual(await recipeKey(guest, kernel, defaultTemplate.packages), other);
  });
});
