// The pages' only script (served from /static: the Content-Security-Policy allows no inline script).
for (const t of document.querySelectorAll('time[datetime]')) {
  const d = new Date(t.getAttribute('datetime'));
  if (!isNaN(d)) { t.textContent = d.toLocaleString(); t.title = t.getAttribute('datetime'); }
}
// for tests and curious people: does the page need sideways scrolling at this width?
const measure = () => { const e = document.documentElement; e.dataset.sidewaysScroll = e.scrollWidth > e.clientWidth; };
measure(); window.addEventListener('load', measure);
