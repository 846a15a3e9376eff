// Genie play page: picks a starting frame, opens a session over the gateway's JSON API and steps it with keys.
// Steps are strictly ordered: key presses go into a queue and one loop sends them, one request at a time. A held key
// steps the world as fast as it answers: when the queue runs dry, the loop sends the held key's action again at
// once (it does not wait for the keyboard's auto-repeat, which is slower than a fast world and starts half a second
// late), until the key is released.
"use strict";

const MAX_QUEUE = 16; // key presses beyond this are dropped, so a held key cannot build up minutes of lag
const PIPELINE = 2; // step requests a held key keeps in flight
// The world's key bindings (GET /api/world "keys") say which latent each arrow sends; an unbound arrow sends nothing.
const ARROWS = { left: "ArrowLeft", right: "ArrowRight", up: "ArrowUp", down: "ArrowDown" };
const GLYPHS = { left: "←", right: "→", up: "↑", down: "↓" };

const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  world: null, // GET /api/world
  worldRef: "", // the chosen catalogue world ("" = the gateway's default): "name" or "name@version"
  keys: new Map(), // KeyboardEvent.key -> action
  unbound: new Map(), // KeyboardEvent.key -> key name, for arrows this world leaves unbound
  prompt: 0, // the chosen prompt index, or null when an uploaded image is chosen
  upload: null, // the chosen uploaded File
  session: null, // the open session's id
  starting: false,
  epoch: 0, // bumped by every (re)start: replies for an older session are dropped
  queue: [],
  inflight: 0, // step requests sent and not answered yet
  shownStep: -1, // the step of the frame on screen
  held: [], // bound keys held down, newest last: [{key, action}]; the newest one repeats
  shown: [], // performance.now() of the frames shown in the last second, for the frame rate
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  let payload;
  if (body instanceof Blob) {
    payload = body;
    headers["Content-Type"] = body.type || "application/octet-stream";
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: payload, cache: "no-store" });
  } catch {
    throw new ApiError(0, "UNAVAILABLE", "cannot reach the gateway");
  }
  if (!resp.ok) {
    let info = {};
    try {
      info = await resp.json();
    } catch {
      // not our JSON error (a proxy's page, say): fall back to the status line
    }
    throw new ApiError(resp.status, info.code || "UNKNOWN", info.message || `${resp.status} ${resp.statusText}`);
  }
  return resp;
}

// --- display ----------------------------------------------------------------------------------------------

function setMode(mode) {
  document.body.dataset.mode = mode;
}

function say(text, isError = false) {
  const el = $("message");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function showError(err) {
  if (err.status === 404 && err.code === "NOT_FOUND") {
    say("This session has expired or was closed. Press Restart (R) to start again.", true);
  } else if (err.status === 401) {
    say(`The token was refused: ${err.message}`, true);
  } else if (err.status === 429) {
    say(`Limit reached: ${err.message}`, true);
  } else {
    say(`Error (${err.code}): ${err.message}`, true);
  }
  setMode("error");
}

function showFrame(reply) {
  state.shownStep = reply.step;
  const img = $("frame");
  img.src = `data:image/png;base64,${reply.frame}`;
  img.hidden = false;
  document.body.dataset.session = reply.session_id; // for tests and for debugging from the console
  $("placeholder").hidden = true;
  $("step").textContent = String(reply.step);
  $("last-action").textContent = reply.action === undefined ? "–" : actionLabel(reply.action, reply.action_name);
  countFrame();
}

// Frames shown in the last second: what a player sees, round trips and decoding included.
function countFrame() {
  const now = performance.now();
  state.shown.push(now);
  while (state.shown.length && now - state.shown[0] > 1000) state.shown.shift();
  const first = state.shown[0];
  const rate = state.shown.length > 1 ? ((state.shown.length - 1) * 1000) / Math.max(now - first, 1) : 0;
  $("fps").textContent = rate ? rate.toFixed(1) : "–";
  document.body.dataset.fps = rate.toFixed(2); // for tests
}

function actionLabel(id, name) {
  return name === `action ${id}` ? name : `${id} · ${name}`; // worlds without names call them "action N"
}

function showQueue() {
  $("queued").textContent = String(state.queue.length);
}

function flash(action) {
  const button = document.querySelector(`#actions button[data-action="${action}"]`);
  if (!button) return;
  button.classList.add("pressed");
  setTimeout(() => button.classList.remove("pressed"), 150);
}

// --- sessions ---------------------------------------------------------------------------------------------

async function start() {
  const epoch = ++state.epoch;
  state.queue = [];
  state.held = [];
  showQueue();
  const old = state.session;
  state.session = null;
  if (old) api("DELETE", `/api/sessions/${old}`).catch(() => {}); // best effort: frees one of our session slots
  if (state.prompt === null && !state.upload) return;
  markChosen();
  state.starting = true;
  setMode("starting");
  say("Starting…");
  try {
    const body = state.upload || { prompt: state.prompt, world: state.worldRef };
    const path = state.upload ? `/api/sessions${worldQuery()}` : "/api/sessions";
    const reply = await (await api("POST", path, body)).json();
    if (epoch !== state.epoch) { // restarted again meanwhile: give this session's slot back
      api("DELETE", `/api/sessions/${reply.session_id}`).catch(() => {});
      return;
    }
    state.session = reply.session_id;
    document.body.dataset.world = reply.world || "";
    showFrame(reply);
    setMode("playing");
    say("Play with the keys or the buttons.");
    pump();
  } catch (err) {
    if (epoch === state.epoch) showError(err);
  } finally {
    if (epoch === state.epoch) state.starting = false;
  }
}

function act(action) {
  if (!state.session && !state.starting) {
    say(state.world && state.world.prompts === 0 ? "Upload a starting frame first." : "Pick a starting frame first (or press R).");
    return;
  }
  if (state.queue.length >= MAX_QUEUE) return;
  state.queue.push(action);
  showQueue();
  flash(action);
  pump();
}

function heldAction() {
  return state.held.length ? state.held[state.held.length - 1].action : undefined;
}

// The only sender of steps. Key presses go one at a time in the order they were pressed (a press waits until nothing
// is in flight). A held key keeps PIPELINE steps in flight: the gateway runs one session's steps one after another,
// so the next one is already waiting when a frame is done, and the world never idles while a reply travels and the
// page draws it. Held steps all send one action, so the order they land in does not matter; a late reply never
// replaces a newer frame.
function pump() {
  if (!state.session) return;
  if (state.queue.length) {
    if (state.inflight === 0) send(state.queue.shift());
    return;
  }
  while (heldAction() !== undefined && state.inflight < PIPELINE) send(heldAction());
}

async function send(action) {
  const epoch = state.epoch;
  const session = state.session;
  state.inflight++;
  showQueue();
  try {
    const reply = await (await api("POST", `/api/sessions/${session}/step`, { action })).json();
    if (epoch === state.epoch && reply.step > state.shownStep) showFrame(reply);
  } catch (err) {
    if (epoch === state.epoch) { // not a failure of a session we already left
      state.queue = [];
      state.held = [];
      if (err.status === 404) state.session = null;
      showError(err);
    }
  } finally {
    state.inflight--;
    showQueue();
    pump();
  }
}

// --- setup ------------------------------------------------------------------------------------------------

function buildKeys(world) {
  const keys = new Map();
  const numActions = world.actions.length;
  for (let a = 0; a < Math.min(numActions, 10); a++) keys.set(String((a + 1) % 10), a); // 1..9, then 0 = action 9
  state.unbound = new Map();
  for (const { key, action } of world.keys || []) {
    if (!(key in ARROWS)) continue; // a key this page has no arrow for
    if (action === null || action >= numActions) state.unbound.set(ARROWS[key], key);
    else keys.set(ARROWS[key], action);
  }
  for (const [name, arrow] of Object.entries(ARROWS)) {
    if (!keys.has(arrow)) state.unbound.set(arrow, name); // a gateway that lists no keys binds none
  }
  return keys;
}

function bindingText(binding, world) {
  if (binding.action === null) return " unbound: no latent action is tied to it";
  const a = binding.action;
  let text = ` ${actionLabel(a, world.actions[a].name)}`;
  if (binding.share !== null) text += ` — ${Math.round(binding.share * 100)}% of its moves press ${binding.key}`;
  return text;
}

function kbd(text) {
  const el = document.createElement("kbd");
  el.textContent = text;
  return el;
}

function buildControls(world) {
  const actions = $("actions");
  actions.replaceChildren();
  const arrowOf = new Map();
  for (const [arrow, a] of state.keys) {
    const name = Object.keys(ARROWS).find((k) => ARROWS[k] === arrow);
    if (name) arrowOf.set(a, GLYPHS[name]);
  }
  for (const { id, name } of world.actions) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.action = String(id);
    button.title = `${name} (action ${id})`;
    if (id < 10) button.append(kbd(String((id + 1) % 10)));
    if (arrowOf.has(id)) button.append(kbd(arrowOf.get(id)));
    const label = document.createElement("span");
    label.textContent = name;
    button.append(label);
    button.addEventListener("click", () => act(id));
    actions.append(button);
  }
  const legend = $("legend");
  legend.replaceChildren();
  const item = (...parts) => {
    const li = document.createElement("li");
    li.append(...parts);
    legend.append(li);
    return li;
  };
  const n = world.actions.length;
  const last = Math.min(n, 10);
  if (last === 1) item(kbd("1"), " latent action 0");
  else item(kbd("1"), "…", kbd(String(last % 10)), ` latent actions 0…${last - 1}`);
  for (const name of Object.keys(ARROWS)) {
    const arrow = ARROWS[name];
    const action = state.keys.has(arrow) ? state.keys.get(arrow) : null;
    const binding = (world.keys || []).find((b) => b.key === name && b.action === action) || { key: name, action, share: null };
    const li = item(kbd(GLYPHS[name]), bindingText(binding, world));
    li.dataset.key = name;
    if (action === null) {
      li.classList.add("unbound");
      li.title = "No latent action of this world is tied to this key, so it sends nothing; the number keys reach every action.";
    }
  }
  item(kbd("R"), " restart from the chosen frame");
}

function markChosen() {
  for (const el of document.querySelectorAll("#prompts button")) {
    el.classList.toggle("selected", state.upload === null && el.dataset.prompt === String(state.prompt));
  }
  $("upload").classList.toggle("selected", state.upload !== null);
}

function choose(index) {
  state.prompt = index;
  state.upload = null;
  start();
}

function chooseUpload(event) {
  const file = event.target.files[0];
  if (!file) return;
  state.upload = file;
  state.prompt = null;
  event.target.value = ""; // choosing the same file again fires change again
  start();
}

async function loadThumb(index, img) {
  try {
    const blob = await (await api("GET", `/api/prompts/${index}${worldQuery()}`)).blob();
    img.src = URL.createObjectURL(blob); // an <img> cannot send the auth header itself
  } catch (err) {
    img.alt = `prompt ${index} (failed: ${err.message})`;
  }
}

function buildPrompts(world) {
  const box = $("prompts");
  box.replaceChildren();
  for (let i = 0; i < world.prompts; i++) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.prompt = String(i);
    button.title = `start from prompt ${i}`;
    const img = document.createElement("img");
    img.alt = `prompt ${i}`;
    button.append(img);
    button.addEventListener("click", () => choose(i));
    box.append(button);
    loadThumb(i, img);
  }
  if (world.prompts === 0) {
    state.prompt = null;
    box.textContent = "This world ships no prompt images.";
  }
}

function showUnbound(name) {
  say(`${GLYPHS[name]} is unbound in this world: no latent action is tied to ${name}. The number keys reach every action.`);
  const li = document.querySelector(`#legend li[data-key="${name}"]`);
  if (!li) return;
  li.classList.add("pressed");
  setTimeout(() => li.classList.remove("pressed"), 300);
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target instanceof HTMLInputElement) return;
  if (event.key === "r" || event.key === "R") {
    event.preventDefault();
    if (!event.repeat) start();
    return;
  }
  if (state.unbound.has(event.key)) {
    event.preventDefault(); // arrows would scroll the page
    if (!event.repeat) showUnbound(state.unbound.get(event.key));
    return;
  }
  const action = state.keys.get(event.key);
  if (action === undefined) return;
  event.preventDefault(); // arrows would scroll the page
  if (event.repeat || state.held.some((h) => h.key === event.key)) return; // the held-key loop repeats it
  state.held.push({ key: event.key, action });
  act(action); // the press itself is one step, even when released before the world answers
}

function onKeyUp(event) {
  const before = state.held.length;
  state.held = state.held.filter((h) => h.key !== event.key);
  if (state.held.length !== before) event.preventDefault();
}

// A key released while the page had no focus sends no keyup: stop repeating rather than walk on forever.
function releaseAll() {
  state.held = [];
}

function worldQuery() {
  return state.worldRef ? `?world=${encodeURIComponent(state.worldRef)}` : "";
}

// A gateway serving a catalogue offers its worlds: each name (its newest live version) and each live version.
async function buildWorlds() {
  const listing = await (await api("GET", "/api/worlds")).json();
  const live = listing.worlds.filter((w) => !w.retired);
  $("worlds").hidden = !listing.catalogue || live.length === 0;
  if ($("worlds").hidden) return;
  const select = $("world-select");
  select.replaceChildren();
  const names = [...new Set(live.map((w) => w.name))];
  for (const name of names) {
    const newest = live.filter((w) => w.name === name).at(-1);
    select.append(new Option(`${name} (newest: v${newest.version})`, name));
    for (const w of live.filter((v) => v.name === name)) select.append(new Option(`${w.ref}`, w.ref));
  }
  state.worldRef = listing.default && names.includes(listing.default) ? listing.default : names[0];
  select.value = state.worldRef;
  select.addEventListener("change", () => {
    state.worldRef = select.value;
    loadWorld();
  });
}

async function connect() {
  $("token-form").hidden = true;
  setMode("loading");
  try {
    await buildWorlds();
    await loadWorld();
  } catch (err) {
    showError(err);
    if (err.status === 401) askToken();
  }
}

async function loadWorld() {
  state.epoch++; // a session of the previous world is not stepped any more
  const old = state.session;
  state.session = null;
  if (old) api("DELETE", `/api/sessions/${old}`).catch(() => {});
  state.prompt = 0;
  state.upload = null;
  setMode("loading");
  try {
    const world = await (await api("GET", `/api/world${worldQuery()}`)).json();
    state.world = world;
    state.keys = buildKeys(world);
    $("world-info").textContent = `${world.width}×${world.height} frames · ${world.actions.length} latent actions · ` +
      `${world.window}-frame memory`;
    $("screen").style.aspectRatio = `${world.width} / ${world.height}`;
    buildControls(world);
    buildPrompts(world);
    document.body.dataset.worldShown = state.worldRef; // the picker's world, once its actions and prompts are built
    $("play").hidden = false;
    setMode("idle");
    say(world.prompts ? "Pick a starting frame." : "Upload a starting frame.");
  } catch (err) {
    showError(err);
    if (err.status === 401) askToken();
  }
}

function askToken() {
  setMode("no-token");
  const form = $("token-form");
  form.hidden = false;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (!token) return;
    state.token = token;
    history.replaceState(null, "", `#token=${encodeURIComponent(token)}`);
    connect();
  }, { once: true });
}

// Leaving or reloading the page closes its session, so reloads do not use up the client's session slots.
// keepalive lets the request outlive the page (sendBeacon cannot carry the Authorization header).
function closeOnLeave() {
  if (!state.session) return;
  fetch(`/api/sessions/${state.session}`, {
    method: "DELETE", headers: { Authorization: `Bearer ${state.token}` }, keepalive: true,
  }).catch(() => {});
  state.session = null;
}

function main() {
  state.token = new URLSearchParams(location.hash.slice(1)).get("token");
  $("restart").addEventListener("click", () => start());
  $("upload-input").addEventListener("change", chooseUpload);
  document.addEventListener("keydown", onKey);
  document.addEventListener("keyup", onKeyUp);
  window.addEventListener("blur", releaseAll);
  window.addEventListener("pagehide", closeOnLeave);
  if (state.token) connect();
  else askToken();
}

main();
