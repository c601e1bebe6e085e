// The page's browser code (clip4cir.serving.page puts it in the head; the events call these functions).
history.scrollRestoration = "manual";  // the page opens at its top, not at a scroll position from before a reload
window.addEventListener("popstate", () => window.location.reload());  // Back: the previous address's search

// each tile of a grid is named by its caption (its id and title) instead of "Thumbnail 1 of 12", for screen readers
new MutationObserver(() => document.querySelectorAll(".thumbnail-item").forEach((tile) => {
  const caption = tile.querySelector(".caption-label");
  const name = caption && caption.innerText.split("\n").slice(0, 2).join(", ");
  if (name && tile.getAttribute("aria-label") !== name) tile.setAttribute("aria-label", name);
})).observe(document.documentElement, {subtree: true, childList: true, characterData: true});

window.clip4cirPage = {
  stepsKey: "clip4cir-steps",  // the session storage entry holding the steps of a refinement

  // the query (values, named by names) into the page address, as a new history entry (push) or in place of the
  // current one, when its first part is given (a search from an uploaded photo cannot be a link); withSteps: the
  // value after them, the steps, into session storage
  address(tab, names, values, push, withSteps) {
    if (withSteps) this.saveSteps(values[names.length]);
    if (!values[0]) return;
    const query = new URLSearchParams({tab: tab});
    names.forEach((name, i) => query.set(name, String(values[i] ?? "")));
    if (window.location.search !== "?" + query) {
      window.history[push ? "pushState" : "replaceState"](null, "", "?" + query);
    }
  },

  loadSteps() {
    try {
      return JSON.parse(sessionStorage.getItem(this.stepsKey) || "[]");
    } catch (e) {
      return [];
    }
  },

  saveSteps(steps) {
    sessionStorage.setItem(this.stepsKey, JSON.stringify(steps || []));
  },

  // the first shown results gallery among ids into view, rank 1 first, when it is not (after a search started
  // further down the page, after a link or Back restored a search, on a phone)
  scrollTo(ids) {
    setTimeout(() => {
      const el = ids.map((i) => document.getElementById(i))
        .find((e) => e && e.offsetParent !== null && e.querySelector(".grid-container img"));
      if (!el) return;
      const top = el.getBoundingClientRect().top;
      if (top < 0 || top > window.innerHeight - 100) el.scrollIntoView({block: "start"});
    }, 50);
  },

  // after a reference is picked: it and the caption box in view, the caption focused for typing the change
  focusCaption() {
    setTimeout(() => {
      const reference = document.getElementById("reference");
      if (reference) reference.scrollIntoView({block: "start"});
      const caption = document.querySelector("#caption textarea");
      if (caption) caption.focus({preventScroll: true});
    }, 50);
  },
};
