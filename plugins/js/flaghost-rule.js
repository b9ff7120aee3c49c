// Helpers for flaghost targeting rules written in JavaScript (componentize-js).
//
// `attempt(fn)` runs `fn` and turns anything it throws into the contract's
// `err(string)` with its text ("TypeError: x is undefined"), so flaghost
// reports the rule's own message instead of a trap.

export function attempt(fn) {
  try {
    return fn();
  } catch (e) {
    throw e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  }
}
