// Render math with the vendored KaTeX on every page load, including Material's instant navigation.
// arithmatex (Markdown pages, docstrings) emits \( \) and \[ \]; notebook cells keep raw $ and $$.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "$$", right: "$$", display: true },
      { left: "$", right: "$", display: false },
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
