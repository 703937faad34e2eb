// Replicate one RxDB collection with one stream of a syncunit unit.
// The code docs/javascript.md walks through; the interop test runs it as is.
import { replicateRxCollection } from 'rxdb/plugins/replication';
import { Subject } from 'rxjs';

/** The RxDB schema of a stream, made by the server from its catalog. */
export async function fetchSchema({ url, unit, stream, token }) {
  const res = await fetch(`${url}/v1/rxdb/${unit}/${stream}/schema`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  if (!res.ok) throw new Error(`schema: ${res.status} ${await res.text()}`);
  return res.json();
}

/**
 * Start replicating `collection` with stream `stream` of unit `unit`.
 * `clientId` names this device (the same on every start, e.g. `await db.storageToken`).
 * `batchSize`: documents per pull and push (a first copy of n rows takes n / batchSize pulls).
 * `onResult` gets the server's verdict on every pushed change:
 * {id, op, status: 'applied' | 'conflict' | 'rejected', code?, reason?}.
 * `params`: the selection of a unit opened on one (its client parameters,
 * e.g. `{ patient_id: 7 }`); one collection per selection.
 */
export function replicateSyncunit({
  collection, url, unit, stream, token, clientId,
  batchSize = 1000, live = true, onResult = () => {}, params = null,
}) {
  const base = `${url}/v1/rxdb/${encodeURIComponent(unit)}/${encodeURIComponent(stream)}`;
  const selection = params ? `params=${encodeURIComponent(JSON.stringify(params))}` : '';
  const headers = {
    Authorization: `Bearer ${token}`,
    'Content-Type': 'application/json',
    'Syncunit-Client-Id': clientId,
  };
  const key = collection.schema.primaryPath;
  const post = async (path, body) => {
    const target = `${base}/${path}${selection && '?'}${selection}`;
    const res = await fetch(target, { method: 'POST', headers, body: JSON.stringify(body) });
    if (!res.ok) throw new Error(`${path}: ${res.status} ${await res.text()}`);
    return res.json();
  };
  const events = new Subject();
  const state = replicateRxCollection({
    collection,
    replicationIdentifier: `syncunit ${url} ${unit} ${stream} ${selection}`,
    live,
    pull: {
      batchSize,
      async handler(checkpoint, size) {
        const body = await post('pull', { checkpoint, batchSize: size });
        let documents = body.documents;
        if (body.reset) {
          // A re-download: what this batch does not hold leaves the device (as the
          // server's deletion; a document with unpushed changes is kept by RxDB).
          const held = new Set(documents.map((d) => d[key]));
          const local = await collection.find().exec();
          const gone = local.filter((d) => !held.has(d.primary));
          documents = documents.concat(gone.map((d) => ({ [key]: d.primary, _deleted: true })));
        }
        return { documents, checkpoint: body.checkpoint };
      },
      stream$: events.asObservable(),
    },
    push: {
      batchSize,
      async handler(rows) {
        const body = await post('push', rows);
        body.results.forEach(onResult);
        return body.conflicts; // the server's state of what it did not apply as sent
      },
    },
  });
  if (live) {
    const stop = new AbortController();
    state.onCancel.push(() => stop.abort());
    const query = `batchSize=${batchSize}${selection && '&'}${selection}`;
    listen(`${base}/pull/stream?${query}`, headers, events, stop.signal);
  }
  return state;
}

/** Server-Sent Events over fetch (EventSource cannot send an Authorization header). */
async function listen(url, headers, events, signal) {
  while (!signal.aborted) {
    try {
      const res = await fetch(url, { headers, signal });
      if (!res.ok) throw new Error(`stream: ${res.status}`);
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of block.split('\n')) {
            if (line.startsWith('data: ')) events.next(JSON.parse(line.slice(6)));
          }
        }
      }
    } catch (err) {
      if (signal.aborted) return;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000)); // then reconnect
  }
}
