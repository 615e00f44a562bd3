// Results as you type: the search form works without this script; with it, the JSON API
// (/api/people) fills the results while the person types. Text goes in with textContent only.
(function () {
  "use strict";
  var form = document.getElementById("search-form");
  var input = document.getElementById("q");
  var results = document.getElementById("results");
  if (!form || !input || !results || !window.fetch) return;
  var d = results.dataset;
  var lang = d.lang;
  var defaultLang = d.defaultLang || "vi";
  var timer = null;
  var latest = 0;

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  }

  function withLang(path) {
    return lang && lang !== defaultLang ? path + "?lang=" + encodeURIComponent(lang) : path;
  }

  function card(p) {
    var article = el("article", undefined, "card");
    var h = el("h3", undefined, "name");
    var a = el("a", p.full_name);
    a.href = withLang("/people/" + encodeURIComponent(p.uid));
    h.appendChild(a);
    article.appendChild(h);
    var dl = el("dl");
    function row(label, value) {
      dl.appendChild(el("dt", label));
      var dd = el("dd");
      if (typeof value === "string") dd.textContent = value; else dd.appendChild(value);
      dl.appendChild(dd);
      return dd;
    }
    // a field this visitor may not see is absent from the answer: treat it as empty
    if (p.title) row(d.title, p.title);
    if (p.unit_path && p.unit_path.length) row(d.unit, p.unit_path.join(" \u203a ")).className = "unit-path";
    if (p.mail) {
      var mail = el("a", p.mail);
      mail.href = "mailto:" + p.mail;
      row(d.mail, mail);
    }
    if (p.phones && p.phones.length) row(d.phones, p.phones.join(", "));
    if (p.mobile && p.mobile.length) row(d.mobile, p.mobile.join(", ")).className = "mobile";
    article.appendChild(dl);
    var formerly = (p.old_addresses || []).concat(p.old_units || []);
    if (formerly.length) article.appendChild(el("p", d.formerly + ": " + formerly.join(", "), "formerly"));
    return article;
  }

  function show(query, data) {
    results.replaceChildren();
    if (!query.trim()) return;
    results.appendChild(el("h2", d.heading));
    if (!data.people.length) {
      results.appendChild(el("p", d.none, "none"));
      return;
    }
    results.appendChild(el("p", d.count.replace("{n}", String(data.count)), "count"));
    data.people.forEach(function (p) { results.appendChild(card(p)); });
  }

  function run() {
    var query = input.value;
    var ticket = ++latest;
    var url = "/?" + new URLSearchParams(lang !== defaultLang ? { q: query, lang: lang } : { q: query });
    fetch("/api/people?" + new URLSearchParams({ q: query }))
      .then(function (r) { return r.ok ? r.json() : { count: 0, people: [] }; })
      .then(function (data) {
        if (ticket !== latest) return; // an older answer arriving late
        show(query, data);
        history.replaceState(null, "", url);
      })
      .catch(function () { /* the form still works */ });
  }

  input.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(run, 200);
  });
})();
