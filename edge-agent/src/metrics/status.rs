//! The status page for the plant engineer: `GET /status` (one small HTML page, no build step,
//! no external assets) and `GET /status.json` (what the page shows, for scripts).
//!
//! # What always holds
//! - The page is a single self-contained document: its script and styles are inline and it
//!   loads nothing from outside the gateway, so it works on a plant network without internet.
//! - It shows only what the agent knows from committed readings ([`super::live`]), the buffer
//!   file and the upload counters: the page never claims a value the agent could still lose.
//! - Every text that comes from a device, a topic or the sensor map is inserted as text, never
//!   as HTML, so a tag named `<script>` shows as its name.
//! - When a token is configured, the page, its JSON and `/metrics` need it (constant-time
//!   comparison); the page passes the token it was opened with on to its own requests.

use std::path::Path;
use std::time::SystemTime;

use serde_json::{Value, json};

use super::live::live;
use super::registry::{Health, global};

/// What `/status.json` answers: the live picture, the buffer and the uploads.
pub(super) async fn snapshot(buffer_path: &Path) -> Value {
    let path = buffer_path.to_owned();
    // A read-only look as one more WAL reader; it never blocks the writer.
    let buffer = tokio::task::spawn_blocking(move || crate::buffer::inspect(&path))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let buffer = match buffer {
        Ok(b) => json!({
            "readings": b.rows,
            "oldest_us": b.time_us.map(|(oldest, _)| oldest),
            "newest_us": b.time_us.map(|(_, newest)| newest),
            "pending": b.pending.map(|p| json!({"first_seq": p.first_seq, "last_seq": p.last_seq})),
            "file_bytes": b.file_bytes,
            "wal_bytes": b.wal_bytes,
            "error": Value::Null,
        }),
        Err(e) => json!({ "error": e }),
    };
    let health = match global().health(SystemTime::now()) {
        Health::Ok => json!({ "status": "ok" }),
        Health::Failing(reason) => json!({ "status": "failing", "reason": reason }),
    };
    let live = live().snapshot();
    json!({
        "now_ms": SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        "version": env!("CARGO_PKG_VERSION"),
        "health": health,
        "map": live.map,
        "buffer": buffer,
        "uploads": global().uploads(),
        "devices": live.devices,
        "tags": live.tags,
        "tags_over_limit": live.tags_over_limit,
    })
}

/// Whether `presented` equals `expected`, in time that does not depend on where they differ.
pub(super) fn token_matches(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, byte) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ byte);
    }
    diff == 0
}

/// The token a request carries: `Authorization: Bearer <token>` or `?token=<token>`.
pub(super) fn presented_token<B>(req: &hyper::Request<B>) -> Option<String> {
    if let Some(value) = req.headers().get(hyper::header::AUTHORIZATION)
        && let Ok(value) = value.to_str()
        && let Some(token) = value.strip_prefix("Bearer ")
    {
        return Some(token.trim().to_owned());
    }
    req.uri()
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token=").map(percent_decode))
}

/// Undoes the `%XX` escapes a browser puts in a query value (and `+` for a space).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    out.push(b);
                    i += 3;
                } else {
                    out.push(b'%');
                    i += 1;
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The page. Plain HTML, CSS and a script that asks `/status.json` every two seconds.
pub(super) const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Plantline edge agent</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2327; background: #f4f5f7; }
  header { background: #1d3557; color: #fff; padding: 10px 18px; display: flex; gap: 24px; align-items: baseline; flex-wrap: wrap; }
  header h1 { font-size: 18px; margin: 0; }
  main { padding: 12px 18px; }
  section { background: #fff; border-radius: 6px; padding: 10px 14px; margin-bottom: 12px; box-shadow: 0 1px 2px #0002; }
  h2 { font-size: 15px; margin: 0 0 8px; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #e3e5e8; white-space: nowrap; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .cards { display: flex; gap: 12px; flex-wrap: wrap; }
  .card { flex: 1 1 180px; }
  .k { color: #5f6b76; font-size: 12px; }
  .v { font-size: 18px; }
  .good { color: #1b7f3b; } .bad { color: #b3261e; font-weight: 600; } .uncertain { color: #a66300; }
  .stale { color: #8a8f94; }
  pre.report { background: #fff4f2; border: 1px solid #f1b0a8; padding: 8px; white-space: pre-wrap; margin: 6px 0 0; }
  input { padding: 4px 8px; width: 260px; }
  #error { color: #b3261e; }
</style>
</head>
<body>
<header>
  <h1>Plantline edge agent</h1>
  <span>gateway <b id="gateway">…</b></span>
  <span>site <b id="site">…</b></span>
  <span>health <b id="health">…</b></span>
  <span id="error"></span>
</header>
<main>
  <section class="cards">
    <div class="card"><div class="k">buffered readings</div><div class="v" id="buffer-readings">…</div></div>
    <div class="card"><div class="k">oldest buffered reading</div><div class="v" id="buffer-oldest">…</div></div>
    <div class="card"><div class="k">batch being uploaded</div><div class="v" id="buffer-pending">…</div></div>
    <div class="card"><div class="k">last upload</div><div class="v" id="last-upload">…</div></div>
    <div class="card"><div class="k">uploaded batches / rows / failures</div><div class="v" id="uploads">…</div></div>
  </section>
  <section>
    <h2>Sensor map</h2>
    <div id="map">…</div>
  </section>
  <section>
    <h2>Devices</h2>
    <table id="devices"><thead><tr><th>device</th><th>state</th><th>readings</th><th>bad</th><th>last good reading</th><th>last error</th></tr></thead><tbody></tbody></table>
  </section>
  <section>
    <h2>Tags <input id="filter" type="search" placeholder="filter by device or tag"></h2>
    <table id="tags"><thead><tr><th>device</th><th>tag</th><th>value</th><th>unit</th><th>quality</th><th>age</th></tr></thead><tbody></tbody></table>
    <div id="over-limit" class="k"></div>
  </section>
</main>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token");
const source = "status.json" + (token ? "?token=" + encodeURIComponent(token) : "");
const $ = (id) => document.getElementById(id);

function age(ms) {
  if (ms == null) return "never";
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 120) return s + " s ago";
  if (s < 7200) return Math.round(s / 60) + " min ago";
  if (s < 172800) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " days ago";
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fill(tableId, items, render) {
  const body = $(tableId).tBodies[0];
  const rows = document.createDocumentFragment();
  for (const item of items) {
    const tr = document.createElement("tr");
    render(tr, item);
    rows.appendChild(tr);
  }
  body.replaceChildren(rows);
}

function show(s) {
  const now = s.now_ms;
  $("gateway").textContent = s.map.gateway || "?";
  $("site").textContent = s.map.site || "?";
  $("health").textContent = s.health.status === "ok" ? "ok" : "failing: " + s.health.reason;
  $("health").className = s.health.status === "ok" ? "good" : "bad";

  const b = s.buffer;
  if (b.error) {
    $("buffer-readings").textContent = "cannot read the buffer: " + b.error;
  } else {
    $("buffer-readings").textContent = b.readings.toLocaleString("en");
    $("buffer-oldest").textContent = b.oldest_us == null ? "empty" : age(now - b.oldest_us / 1000);
    $("buffer-pending").textContent = b.pending ? "seq " + b.pending.first_seq + "–" + b.pending.last_seq : "none";
  }
  const u = s.uploads;
  $("last-upload").textContent = age(u.last_upload_ms == null ? null : now - u.last_upload_ms);
  $("uploads").textContent = u.batches + " / " + u.rows + " / " + u.failures;

  const map = $("map");
  map.replaceChildren();
  const line = document.createElement("div");
  line.textContent = (s.map.path ? s.map.path : "built in") + ", loaded " + age(s.map.loaded_ms ? now - s.map.loaded_ms : null);
  map.appendChild(line);
  const state = document.createElement("div");
  if (s.map.rejected) {
    state.textContent = "The last edit was rejected; the map above stays in force:";
    state.className = "bad";
    const pre = document.createElement("pre");
    pre.className = "report";
    pre.textContent = s.map.rejected;
    map.append(state, pre);
  } else {
    state.textContent = "valid, in force";
    state.className = "good";
    map.appendChild(state);
  }

  fill("devices", s.devices, (tr, d) => {
    cell(tr, d.device);
    cell(tr, d.last_error ? "failing" : "ok", d.last_error ? "bad" : "good");
    cell(tr, d.readings, "num");
    cell(tr, d.bad, "num");
    cell(tr, age(d.last_good_us == null ? null : now - d.last_good_us / 1000));
    cell(tr, d.last_error ? d.last_error + " (" + age(now - d.last_error_ms) + ")" : "");
  });

  const wanted = $("filter").value.trim().toLowerCase();
  const tags = wanted ? s.tags.filter((t) => (t.device + "/" + t.tag).toLowerCase().includes(wanted)) : s.tags;
  fill("tags", tags, (tr, t) => {
    tr.dataset.tag = t.device + "/" + t.tag;
    cell(tr, t.device);
    cell(tr, t.tag);
    cell(tr, t.value == null ? "—" : String(t.value), "num value");
    cell(tr, t.unit || "");
    cell(tr, t.quality, t.quality);
    cell(tr, age(now - t.ts_us / 1000));
  });
  $("over-limit").textContent = s.tags_over_limit ? s.tags_over_limit + " readings of tags beyond the table's limit are not shown" : "";
  $("error").textContent = "";
  document.body.dataset.loaded = "true";
}

async function refresh() {
  try {
    const response = await fetch(source, { cache: "no-store" });
    if (!response.ok) throw new Error("the agent answered " + response.status);
    show(await response.json());
  } catch (e) {
    $("error").textContent = "not updating: " + e.message;
  }
}

$("filter").addEventListener("input", refresh);
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cre", "s3cret"));
        assert!(!token_matches("s3cretx", "s3cret"));
        assert!(!token_matches("", "s3cret"));
        assert!(!token_matches("S3cret", "s3cret"));
    }

    #[test]
    fn the_token_comes_from_the_header_or_the_query() {
        let req = hyper::Request::get("/status")
            .header("Authorization", "Bearer abc")
            .body(())
            .expect("a static request builds");
        assert_eq!(presented_token(&req).as_deref(), Some("abc"));
        let req = hyper::Request::get("/status.json?x=1&token=a%2Bb%20c")
            .body(())
            .expect("a static request builds");
        assert_eq!(presented_token(&req).as_deref(), Some("a+b c"));
        let req = hyper::Request::get("/status").body(()).expect("builds");
        assert_eq!(presented_token(&req), None);
    }
}
