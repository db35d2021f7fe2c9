// The demo page's built-in tools: the page runs them itself when the model
// calls them, and continues the conversation with their results.
//
// With the simulated provider a prompt that names a tool calls it (e.g.
// "get_weather in Paris", "get_time in UTC and get_weather Oslo" for two
// parallel calls); a real model calls them when it sees fit.
//
// In an agent run (the "Agent run" option) the server does the loop: the
// page answers get_weather, get_time and book_table as handlers of its
// client (client.tools), book_table waits for your Approve first, and
// ask_helper is routed to a second agent, the page's helper (another
// session: its own Client), which answers it. With the simulated provider,
// stages separated by ", then" are one step each: "get_weather in Oslo,
// then book_table in Oslo, then ask_helper on Oslo".

export const DEMO_TOOLS = Object.freeze([
  {
    name: "get_weather",
    description: "The current weather in a city (a demo: made up, the same for a city every time).",
    parameters: {
      type: "object",
      properties: { city: { type: "string", description: "The city, e.g. Paris" } },
      required: ["city"],
    },
  },
  {
    name: "get_time",
    description: "The current time in a time zone (an IANA name like Europe/Paris, or UTC).",
    parameters: {
      type: "object",
      properties: { zone: { type: "string", description: "The time zone" } },
      required: ["zone"],
    },
  },
]);

/** The tools of an agent run: the demo tools, one that needs an approval, one the helper agent answers. */
export function runTools(helper) {
  return [
    ...DEMO_TOOLS,
    {
      name: "book_table",
      description: "Book a table in a city's restaurant (a demo; it needs your approval).",
      parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
      approval: true,
    },
    {
      name: "ask_helper",
      description: "Ask the helper agent (another session) about a topic.",
      parameters: { type: "object", properties: { topic: { type: "string" } }, required: ["topic"] },
      agent: helper,
      timeout_ms: 20_000,
    },
  ];
}

/** What the helper agent answers (it runs in its own session). */
export function helperAnswer({ topic }) {
  return { topic: String(topic), note: `the helper agent looked into ${topic}: all set` };
}

const SKIES = ["clear", "sunny", "cloudy", "light rain", "windy", "foggy", "snow showers"];

function hash(text) {
  let h = 0;
  for (const ch of String(text).toLowerCase()) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return h;
}

const IMPLEMENTATIONS = {
  get_weather({ city }) {
    const h = hash(city);
    return { city: String(city), temp_c: (h % 35) - 5, sky: SKIES[h % SKIES.length] };
  },
  book_table({ city }) {
    return { city: String(city), booked: true, table: 1 + (hash(city) % 20), at: "19:30" };
  },
  get_time({ zone }) {
    const now = new Date();
    try {
      const time = new Intl.DateTimeFormat("en-GB", { timeZone: zone, timeStyle: "short", hour12: false }).format(now);
      return { zone: String(zone), time };
    } catch {
      return { zone: String(zone), time: now.toISOString().slice(11, 16), note: "unknown zone: UTC shown" };
    }
  },
};

/**
 * Run one call: resolves with the text of its `tool` message (JSON), never
 * rejects (an unknown tool or a failure is the result the model sees).
 * @param {{name: string, arguments: object}} call
 */
export async function runTool(call) {
  const implementation = IMPLEMENTATIONS[call.name];
  if (!implementation) return JSON.stringify({ error: `no tool named ${call.name}` });
  try {
    return JSON.stringify(await implementation(call.arguments ?? {}));
  } catch (error) {
    return JSON.stringify({ error: String(error?.message ?? error) });
  }
}
