"""The review app's HTML: server-rendered, every name and path escaped, one small script of our own
(keyboard review), no network assets. Links carry the session token; the script sends it in a header."""

from __future__ import annotations

import html
import math
from typing import Any, Sequence
from urllib.parse import quote

CSS = """
body{font:14px system-ui,sans-serif;margin:1em 2em;color:#222}
a{color:#0645ad} h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.2em}
.grid{display:flex;flex-wrap:wrap;gap:8px}
.face{border:3px solid #ccc;padding:3px;width:140px;font-size:12px;text-align:center;outline:none;background:#fff}
.face img{width:128px;height:128px;object-fit:cover;display:block;margin:auto}
.face:focus{border-color:#1a73e8;box-shadow:0 0 0 3px #aecbfa}
.face.confirmed{border-color:#1e8e3e}.face.rejected,.face.ignored,.face.out{border-color:#d93025;opacity:.45}
.line{border-top:2px dashed #888;margin:1.5em 0 .5em;padding-top:.3em;color:#555}
.keys{color:#555;font-size:12px} .group{margin-bottom:1.5em}
table{border-collapse:collapse} td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
svg.photo{max-width:100%;max-height:80vh}
svg text{font:bold 14px sans-serif;fill:#fff;paint-order:stroke;stroke:#000;stroke-width:3px}
"""

SCRIPT = r"""
(function(){
  const token = document.querySelector('meta[name=token]').content;
  const faces = Array.from(document.querySelectorAll('.face'));
  const status = document.getElementById('status');
  let last = [];
  function say(t){ if(status) status.textContent = t; }
  async function post(url, body){
    const r = await fetch(url, {method:'POST', headers:{'X-Token':token,'Content-Type':'application/json'},
                                body: JSON.stringify(body)});
    const j = await r.json().catch(()=>({error: r.statusText}));
    if(!r.ok) throw new Error(j.error || r.statusText);
    return j;
  }
  function move(el, step){
    const i = faces.indexOf(el);
    const n = faces[Math.min(faces.length-1, Math.max(0, i+step))];
    if(n) n.focus();
  }
  async function decide(el, kind){
    const name = el.dataset.name || null;
    if(kind !== 'ignore' && !name){ say('no name here: use the name box'); return; }
    try{
      const j = await post('/decide', {face_id: Number(el.dataset.faceId), kind: kind, name: name});
      el.classList.remove('confirmed','rejected','ignored');
      el.classList.add(kind === 'confirm' ? 'confirmed' : kind === 'reject' ? 'rejected' : 'ignored');
      el.querySelector('.state').textContent = kind + ' #' + j.decision;
      el.dataset.decision = j.decision;
      last.push(el);
      say('decision ' + j.decision + ': ' + kind + (name ? ' ' + name : ''));
      move(el, 1);
    }catch(e){ say('error: ' + e.message); }
  }
  async function undoLast(){
    const el = last.pop(); if(!el) return;
    try{
      await post('/undo', {decision: Number(el.dataset.decision)});
      el.classList.remove('confirmed','rejected','ignored');
      el.querySelector('.state').textContent = 'undone'; el.focus();
      say('undone ' + el.dataset.decision);
    }catch(e){ say('error: ' + e.message); }
  }
  document.addEventListener('keydown', function(ev){
    if(ev.target.tagName === 'INPUT') return;
    const el = document.activeElement && document.activeElement.classList.contains('face') ? document.activeElement : null;
    if(ev.key === 'u'){ undoLast(); ev.preventDefault(); return; }
    if(!el){ if(['ArrowRight','ArrowDown','j'].includes(ev.key) && faces[0]){ faces[0].focus(); ev.preventDefault(); } return; }
    if(ev.key === 'ArrowRight' || ev.key === 'ArrowDown' || ev.key === 'j'){ move(el, 1); ev.preventDefault(); }
    else if(ev.key === 'ArrowLeft' || ev.key === 'ArrowUp' || ev.key === 'k'){ move(el, -1); ev.preventDefault(); }
    else if(ev.key === 'y'){ if(el.dataset.mode === 'group'){ el.classList.remove('out'); move(el,1);} else decide(el, 'confirm'); ev.preventDefault(); }
    else if(ev.key === 'n'){ if(el.dataset.mode === 'group'){ el.classList.toggle('out'); move(el,1);} else decide(el, 'reject'); ev.preventDefault(); }
    else if(ev.key === 'x'){ decide(el, 'ignore'); ev.preventDefault(); }
  });
  document.querySelectorAll('form.name-group').forEach(function(f){
    f.addEventListener('submit', async function(ev){
      ev.preventDefault();
      const name = f.querySelector('input[name=name]').value.trim();
      const ids = Array.from(document.querySelectorAll('.face[data-group="' + f.dataset.group + '"]'))
        .filter(el => !el.classList.contains('out') && !el.classList.contains('ignored'))
        .map(el => Number(el.dataset.faceId));
      if(!name){ say('type a name first'); return; }
      try{
        const j = await post('/name', {name: name, face_ids: ids});
        say(name + ': ' + j.named + ' faces named' + (j.left_out.length ? ', ' + j.left_out.length + ' left out by the outlier check' : ''));
        f.closest('.group').classList.add('named');
      }catch(e){ say('error: ' + e.message); }
    });
  });
  document.querySelectorAll('button.undo').forEach(function(b){
    b.addEventListener('click', async function(){
      try{ await post('/undo', {decision: Number(b.dataset.decision)}); b.replaceWith('undone'); say('undone ' + b.dataset.decision); }
      catch(e){ say('error: ' + e.message); }
    });
  });
  if(faces[0]) faces[0].focus();
})();
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def link(path: str, token: str) -> str:
    return f"{path}?token={quote(token)}"


def page(title: str, body: str, token: str, nonce: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="token" content="{esc(token)}">'
            f'<meta name="referrer" content="no-referrer"><title>{esc(title)}</title>'
            f'<style nonce="{nonce}">{CSS}</style></head><body>'
            f'<p><a href="{esc(link("/", token))}">people</a> · <a href="{esc(link("/groups", token))}">unknown groups</a>'
            f' · <a href="{esc(link("/decisions", token))}">decisions</a></p>'
            f'<h1>{esc(title)}</h1><p id="status" class="keys" role="status"></p>{body}'
            f'<script nonce="{nonce}">{SCRIPT}</script></body></html>')


KEYS = ('<p class="keys">Keys: ← → move · <b>y</b> it is this person (confirm) · <b>n</b> it is not (reject) · '
        '<b>x</b> not a face · <b>u</b> undo the last decision. Each key is a decision, kept at once.</p>')
GROUP_KEYS = ('<p class="keys">Keys: ← → move · <b>n</b> leave this face out of the group (again: back in) · '
              '<b>x</b> not a face · <b>u</b> undo. Then type a name and press Enter: the faces left in become that '
              'person (faces the outlier check flags are left out). Naming two groups alike merges them.</p>')


def _score(row: dict) -> str:
    d = row.get("distance")
    if d is None or (isinstance(d, float) and not math.isfinite(d)):
        return ""
    return f"distance {d:.3f} / {row['threshold']:.3f}"


def figure(row: dict, token: str, name: str | None, mode: str = "person", group: int | None = None) -> str:
    """One face: its thumbnail (by face id), score, decision note; focusable for the keyboard."""
    note = row.get("note") or ""
    state = "confirmed" if note.startswith("confirmed") else ""
    attrs = f' data-group="{group}"' if group is not None else ""
    face_id, file_id, k = int(row["face_id"]), int(row["file_id"]), int(row["face"])
    photo_url, thumb_url = esc(link(f"/photo/{file_id}", token)), esc(link(f"/thumb/{face_id}", token))
    return (f'<div class="face {state}" tabindex="0" data-face-id="{face_id}" data-mode="{mode}"'
            f' data-name="{esc(name or "")}"{attrs}>'
            f'<a href="{photo_url}" tabindex="-1"><img loading="lazy" alt="face {k}" src="{thumb_url}"></a>'
            f'<div>{esc(_score(row))}</div><div class="state">{esc(note)}</div></div>')


def index_page(people: Sequence[tuple[str, int, int]], groups: int | None, token: str, nonce: str,
               source: str) -> str:
    # the name goes in the query: a name may hold any character, "/" included
    rows = "".join(f'<tr><td><a href="{esc(link("/person", token) + "&name=" + quote(n, safe=""))}">{esc(n)}</a></td>'
                   f"<td>{m}</td><td>{near}</td></tr>" for n, m, near in people)
    body = (f'<p class="keys">index {esc(source)}</p>'
            + (f"<table><tr><th>person</th><th>matched faces</th><th>near misses</th></tr>{rows}</table>"
               if people else "<p>Nobody is enrolled yet: name a group of unknown faces.</p>")
            + f'<p><a href="{esc(link("/groups", token))}">unknown faces, grouped</a></p>')
    return page("faceverify review", body, token, nonce)


def person_page(name: str, matched: Sequence[dict], near: Sequence[dict], token: str, nonce: str) -> str:
    body = (KEYS + f"<h2>{len(matched)} matched faces, best first</h2>"
            + '<div class="grid matched">' + "".join(figure(r, token, name) for r in matched) + "</div>"
            + f'<div class="line">below the line: {len(near)} near misses, closest first</div>'
            + '<div class="grid near">' + "".join(figure(r, token, name) for r in near) + "</div>")
    return page(name, body, token, nonce)


def groups_page(groups: Sequence[tuple[int, list[dict]]], considered: int, token: str, nonce: str,
                max_per_group: int = 48) -> str:
    parts = [GROUP_KEYS, f"<p>{len(groups)} groups among {considered} faces matched to nobody, largest first.</p>"]
    for gid, rows in groups:
        shown = rows[:max_per_group]
        parts.append(f'<div class="group" data-group="{gid}"><h2>group {gid}: {len(rows)} faces'
                     + (f" ({len(shown)} shown)" if len(shown) < len(rows) else "") + "</h2>"
                     f'<form class="name-group" data-group="{gid}"><input name="name" placeholder="name" '
                     'autocomplete="off"> <button>name this group</button></form><div class="grid">'
                     + "".join(figure(r, token, None, mode="group", group=gid) for r in shown) + "</div></div>")
    return page("unknown faces", "".join(parts), token, nonce)


def photo_page(path: str, size: tuple[int, int], faces: Sequence[dict], file_id: int, token: str, nonce: str) -> str:
    w, h = size
    boxes = "".join(
        f'<rect x="{f["x1"]:.1f}" y="{f["y1"]:.1f}" width="{f["x2"] - f["x1"]:.1f}" height="{f["y2"] - f["y1"]:.1f}" '
        f'fill="none" stroke="{"#1e8e3e" if f.get("match") else "#fbbc04"}" stroke-width="{max(2, w / 300):.1f}"/>'
        f'<text x="{f["x1"]:.1f}" y="{max(14.0, f["y1"] - 4):.1f}">{int(f["face"])}: '
        f'{esc(f.get("identity") or "unknown")}</text>' for f in faces)
    svg = (f'<svg viewBox="0 0 {w} {h}" class="photo" role="img" aria-label="{esc(path)}">'
           f'<image href="{esc(link(f"/image/{file_id}", token))}" width="{w}" height="{h}"/>{boxes}</svg>')
    table = "".join(f"<tr><td>{int(f['face'])}</td><td>{esc(f.get('identity') or '')}</td>"
                    f"<td>{esc(f.get('nearest') or '')}</td><td>{esc(_score(f))}</td><td>{esc(f.get('note') or '')}</td>"
                    "</tr>" for f in faces)
    body = (f"<p>{esc(path)}</p>{svg}<table><tr><th>face</th><th>matched</th><th>nearest</th><th>score</th>"
            f"<th>decision</th></tr>{table}</table>" + KEYS + '<div class="grid">'
            + "".join(figure(f, token, f.get("identity") or f.get("nearest")) for f in faces) + "</div>")
    return page("photo", body, token, nonce)


def _decision_state(d: Any, gone: set[int]) -> str:
    if d.undone_by:
        return f"undone by {int(d.undone_by)}"
    if d.kind == "undo":
        return ""
    button = f'<button class="undo" data-decision="{int(d.id)}">undo</button>'
    return ("face gone from the index " if d.id in gone else "") + button


def decisions_page(rows: Sequence[Any], gone: set[int], token: str, nonce: str) -> str:
    what = {"confirm": "is", "reject": "is not", "ignore": "is not a face", "undo": "undo of"}
    trs = "".join(
        f"<tr><td>{d.id}</td><td>{esc(d.made)}</td><td>{esc(d.origin)}</td><td>{esc(what[d.kind])} "
        f"{esc(d.name or (d.undoes if d.kind == 'undo' else ''))}</td><td>{esc(d.path or '')}</td>"
        f"<td>{'' if d.face is None else int(d.face)}</td>"
        f"<td>{_decision_state(d, gone)}</td></tr>" for d in reversed(rows))
    return page("decisions", f"<table><tr><th>id</th><th>time</th><th>origin</th><th>decision</th><th>photo</th>"
                             f"<th>face</th><th></th></tr>{trs}</table>", token, nonce)
