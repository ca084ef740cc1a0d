// A typed client of the live service, as a frontend would write one: types generated from its
// /openapi.json by openapi-typescript (./api.d.ts), calls made with openapi-fetch, every route
// with minimal bodies. tsc --strict checks it, then Node runs it against the service
// (API_URL, and DOWN_URL: the service with its database down). It prints one line per step.
import assert from "node:assert/strict";
import createClient from "openapi-fetch";
import type { components, operations, paths } from "./api";

// --- what the generated types say, checked by the compiler ---------------------------------

type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
function typeIs<T extends true>(): T | void {}
type Schemas = components["schemas"];
// A client sends only what it means to: every field the API fills in is optional.
typeIs<Equal<Schemas["NewTodo"], { title: string; completed?: boolean }>>();
typeIs<Equal<Schemas["TodoChanges"], { title?: string; completed?: boolean }>>();
// A response field that is always sent is never optional.
typeIs<Equal<Schemas["Todo"], { id: string; title: string; completed: boolean; created_at: string; updated_at: string }>>();
typeIs<Equal<Schemas["Problem"], { type: string; title: string; status: number; detail: string }>>();
typeIs<Equal<Schemas["Readiness"]["status"], string>>();
typeIs<Equal<Schemas["Readiness"]["pool"], Schemas["PoolStatus"] | null | undefined>>();
// The headers: Location always comes with a 201, Link only when more remain, Retry-After with a 503.
type CreatedHeaders = operations["createTodo"]["responses"][201]["headers"];
type PageHeaders = operations["listTodos"]["responses"][200]["headers"];
type UnavailableHeaders = operations["listTodos"]["responses"][503]["headers"];
typeIs<Equal<CreatedHeaders["Location"], string>>();
typeIs<Equal<PageHeaders["Link"], string | undefined>>();
typeIs<Equal<UnavailableHeaders["Retry-After"], number>>();
type CreateHeaders = NonNullable<operations["createTodo"]["parameters"]["header"]>;
typeIs<Equal<CreateHeaders["Idempotency-Key"], string | undefined>>();
typeIs<Equal<NonNullable<operations["listTodos"]["parameters"]["query"]>["limit"], number | undefined>>();

// --- the calls -----------------------------------------------------------------------------

const apiUrl = process.env.API_URL, downUrl = process.env.DOWN_URL;
assert.ok(apiUrl && downUrl, "set API_URL and DOWN_URL");
const client = createClient<paths>({ baseUrl: apiUrl });

function required(value: string | null, name: string): string {
  assert.ok(value !== null, `${name} is missing`);
  return value;
}

function step(name: string): void {
  console.log(`ok ${name}`);
}

{
  const { data, response } = await client.GET("/healthz");
  assert.equal(response.status, 200);
  assert.deepEqual(data, { status: "ok" });
  step("healthz");
}
{
  const { data, response } = await client.GET("/readyz");
  assert.equal(response.status, 200);
  assert.equal(data?.database, "reachable");
  assert.ok((data?.pool?.size ?? 0) >= 1);
  step("readyz");
}
{
  const { data, response } = await client.GET("/openapi.json");
  assert.equal(response.status, 200);
  assert.equal((data as Record<string, unknown>)["openapi"], "3.1.0");
  step("openapi");
}

// POST with only a title, and an Idempotency-Key: a retry answers with the same todo.
const key = crypto.randomUUID();
const created = await client.POST("/todos", {
  body: { title: "  typed milk  " },
  params: { header: { "Idempotency-Key": key } },
});
assert.equal(created.response.status, 201);
assert.ok(created.data);
const todo: Schemas["Todo"] = created.data;
assert.equal(todo.title, "typed milk");
assert.equal(todo.completed, false);
const location: CreatedHeaders["Location"] = required(created.response.headers.get("Location"), "Location");
assert.equal(location, `/todos/${todo.id}`);
const retried = await client.POST("/todos", { body: { title: "typed milk" }, params: { header: { "Idempotency-Key": key } } });
assert.equal(retried.response.status, 201);
assert.equal(retried.data?.id, todo.id);
step("create, and retry with the same Idempotency-Key");

const second = await client.POST("/todos", { body: { title: "typed bread", completed: true } });
assert.equal(second.response.status, 201);
assert.equal(second.data?.completed, true);
step("create completed");

// Pages: the Link header carries the next page's path and query.
const first = await client.GET("/todos", { params: { query: { limit: 1 } } });
assert.equal(first.response.status, 200);
assert.deepEqual(first.data?.map((t) => t.id), [second.data?.id]);
const link: PageHeaders["Link"] = first.response.headers.get("Link") ?? undefined;
assert.ok(link, "a page with more after it has a Link header");
const next = new URL(required(/<([^>]+)>; rel="next"/.exec(link)?.[1] ?? null, "the next page"), apiUrl);
const cursor = required(next.searchParams.get("cursor"), "cursor");
const following = await client.GET("/todos", { params: { query: { limit: 1, cursor } } });
assert.deepEqual(following.data?.map((t) => t.id), [todo.id]);
const open = await client.GET("/todos", { params: { query: { completed: false } } });
assert.ok(open.data?.every((t) => !t.completed) && open.data.some((t) => t.id === todo.id));
step("list, follow Link, filter");

{
  const { data, response } = await client.GET("/todos/{todo_id}", { params: { path: { todo_id: todo.id } } });
  assert.equal(response.status, 200);
  assert.deepEqual(data, todo);
  step("get");
}

// PATCH with only `completed`.
const patched = await client.PATCH("/todos/{todo_id}", {
  params: { path: { todo_id: todo.id } },
  body: { completed: true },
});
assert.equal(patched.response.status, 200);
assert.equal(patched.data?.completed, true);
assert.equal(patched.data?.title, "typed milk");
assert.ok(Date.parse(patched.data.updated_at) > Date.parse(todo.updated_at));
step("patch");

// Errors are application/problem+json: `error` is the Problem, with the detail naming the field.
{
  const { data, error, response } = await client.POST("/todos", { body: { title: " " } });
  assert.equal(data, undefined);
  assert.equal(response.status, 422);
  assert.equal(response.headers.get("Content-Type"), "application/problem+json");
  assert.ok(error);
  const problem: Schemas["Problem"] = error;
  assert.equal(problem.status, 422);
  assert.match(problem.detail, /^title: /);
  step("a 422 problem's detail");
}
{
  const { error, response } = await client.GET("/todos/{todo_id}", { params: { path: { todo_id: crypto.randomUUID() } } });
  assert.equal(response.status, 404);
  assert.equal(error?.title, "Not Found");
  step("a 404 problem");
}
{
  const down = createClient<paths>({ baseUrl: downUrl });
  const { error, response } = await down.GET("/todos");
  assert.equal(response.status, 503);
  const retryAfter: UnavailableHeaders["Retry-After"] = Number(required(response.headers.get("Retry-After"), "Retry-After"));
  assert.ok(retryAfter >= 1 && retryAfter <= 10);
  assert.equal(error?.status, 503);
  step("a 503 with Retry-After");
}

{
  const { response } = await client.DELETE("/todos/{todo_id}", { params: { path: { todo_id: todo.id } } });
  assert.equal(response.status, 204);
  const gone = await client.GET("/todos/{todo_id}", { params: { path: { todo_id: todo.id } } });
  assert.equal(gone.response.status, 404);
  step("delete");
}
