// Loaded on pages with widgets, after require.js and before embed-amd.js (see nb_ipywidgets_js
// in _config.yml). Two adjustments so the self-hosted @jupyter-widgets/html-manager works offline:
(function () {
  "use strict";
  // 1. The widget bundles find their font files relative to their AMD module URL, which
  //    require.js would place next to the page ("book/@jupyter-widgets/..."): map the module
  //    names to the folder that holds embed-amd.js and the fonts.
  var vendor = new URL("vendor/widgets", document.currentScript.src).href;
  window.requirejs.config({
    paths: { "@jupyter-widgets/html-manager/dist": vendor, "@jupyter-widgets": vendor },
  });

  // 2. The widgets typeset their labels with the MathJax 2 call MathJax.Hub.Queue(...);
  //    Sphinx loads MathJax 3, which has no Hub, so every label threw a TypeError. Give each
  //    MathJax object (the config object now, MathJax itself once loaded) a Hub whose Queue
  //    forwards to MathJax 3's typesetPromise.
  function queue() {
    var mj = window.MathJax;
    Array.prototype.forEach.call(arguments, function (job) {
      var element = Array.isArray(job) ? job[2] : null;
      if (!element || !mj) return;
      if (mj.typesetPromise) {
        mj.typesetPromise([element]).catch(function () {});
      } else if (mj.startup && mj.startup.promise) {
        mj.startup.promise.then(function () { return mj.typesetPromise([element]); }).catch(function () {});
      } // else MathJax is not loaded yet: its start-up typesets the whole page.
    });
  }
  function withHub(mj) {
    if (mj && typeof mj === "object" && !mj.Hub) {
      Object.defineProperty(mj, "Hub", { value: { Queue: queue }, enumerable: false, configurable: true });
    }
    return mj;
  }
  var current = withHub(window.MathJax);
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    get: function () { return current; },
    set: function (value) { current = withHub(value); },
  });
})();
