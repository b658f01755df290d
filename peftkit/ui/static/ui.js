// The runs table: sort by a column (click its header), filter by any text, refresh while a run trains.
(function () {
  const table = document.getElementById("runs");
  if (!table) return;
  const body = table.tBodies[0];
  const filter = document.getElementById("filter");
  const count = document.getElementById("count");
  let sortKey = null, sortDir = 1;

  function value(row, index) {
    const text = row.cells[index].dataset.sort;
    const number = parseFloat(text);
    return text !== "" && !isNaN(number) && String(number) === text.trim() ? number : text.toLowerCase();
  }
  function apply() {
    const rows = Array.from(body.rows);
    if (sortKey !== null) {
      rows.sort((a, b) => { const x = value(a, sortKey), y = value(b, sortKey); return (x > y ? 1 : x < y ? -1 : 0) * sortDir; });
      rows.forEach(r => body.appendChild(r));
    }
    const words = (filter.value || "").toLowerCase().split(/\s+/).filter(Boolean);
    let shown = 0;
    rows.forEach(r => { const ok = words.every(w => r.textContent.toLowerCase().includes(w)); r.hidden = !ok; shown += ok; });
    count.textContent = shown + " of " + rows.length + " runs";
  }
  Array.from(table.tHead.rows[0].cells).forEach((cell, index) => {
    if (!cell.classList.contains("sortable")) return;
    cell.addEventListener("click", () => {
      sortDir = sortKey === index ? -sortDir : 1; sortKey = index;
      table.querySelectorAll("th").forEach(th => th.classList.remove("sorted-asc", "sorted-desc"));
      cell.classList.add(sortDir > 0 ? "sorted-asc" : "sorted-desc");
      apply();
    });
  });
  filter.addEventListener("input", apply);
  async function refresh() {  // new runs appear, running ones move on; checked boxes stay checked
    const checked = new Set(Array.from(body.querySelectorAll("input:checked")).map(i => i.value));
    const answer = await fetch("/api/runs/rows");
    if (!answer.ok) return;
    body.innerHTML = await answer.text();
    body.querySelectorAll("input[name=runs]").forEach(i => { i.checked = checked.has(i.value); });
    apply();
  }
  setInterval(refresh, 5000);
  apply();
})();
