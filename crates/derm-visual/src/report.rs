//! One self-contained HTML page summarising a run: headings, paragraphs, tables, key-value
//! lists, preformatted text and figures.
//!
//! The page has inline CSS and no scripts or external resources. Images are referenced by paths
//! relative to the report (they sit beside it), or, with [`Report::embed`], inlined as base64
//! `data:` URIs so the one file can be mailed around. All text is HTML-escaped.
//!
//! ```no_run
//! # fn main() -> derm_core::Result<()> {
//! let mut r = derm_visual::report::Report::new("Segmentation run");
//! r.section("Training")
//!     .paragraph("U-Net, 40 epochs.")
//!     .image("loss.png", "loss and validation Jaccard");
//! r.section("Scores").table(&["split", "Jaccard"], vec![vec!["val".into(), "0.781".into()]]);
//! r.write(std::path::Path::new("runs/seg/report.html"))?;
//! # Ok(()) }
//! ```
//!
//! **Consumes:** text, tables, PNG/JPEG/SVG files beside the report. **Produces:** `report.html`.

use std::path::Path;

use derm_core::{Error, Result};

/// One piece of a section, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    /// A paragraph of plain text.
    Paragraph(String),
    /// A table with a header row; cells that read as numbers are right-aligned.
    Table {
        /// Column headings.
        headers: Vec<String>,
        /// Rows of cells.
        rows: Vec<Vec<String>>,
    },
    /// One figure: path relative to the report, and caption.
    Image {
        /// Path relative to the report's folder.
        path: String,
        /// Caption shown under the image (may be empty).
        caption: String,
    },
    /// Figures side by side (wrapping on narrow screens): (path, caption) each.
    ImagesRow(Vec<(String, String)>),
    /// A two-column list of names and values.
    Kv(Vec<(String, String)>),
    /// Monospaced text kept as written (logs, configs).
    Pre(String),
}

/// A section: a heading and its blocks.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Section {
    /// The heading.
    pub heading: String,
    /// The blocks under it, in order.
    pub blocks: Vec<Block>,
}

impl Section {
    /// Adds a paragraph.
    pub fn paragraph(&mut self, text: impl Into<String>) -> &mut Self {
        self.blocks.push(Block::Paragraph(text.into()));
        self
    }

    /// Adds a table.
    pub fn table(&mut self, headers: &[&str], rows: Vec<Vec<String>>) -> &mut Self {
        let headers = headers.iter().map(|h| h.to_string()).collect();
        self.blocks.push(Block::Table { headers, rows });
        self
    }

    /// Adds a figure; `path` is relative to the report's folder.
    pub fn image(&mut self, path: &str, caption: impl Into<String>) -> &mut Self {
        self.blocks.push(Block::Image { path: path.to_string(), caption: caption.into() });
        self
    }

    /// Adds figures side by side: (path relative to the report, caption) each.
    pub fn images_row<P: Into<String>, C: Into<String>>(&mut self, images: Vec<(P, C)>) -> &mut Self {
        self.blocks.push(Block::ImagesRow(images.into_iter().map(|(p, c)| (p.into(), c.into())).collect()));
        self
    }

    /// Adds a list of names and values.
    pub fn kv<K: Into<String>, V: Into<String>>(&mut self, pairs: Vec<(K, V)>) -> &mut Self {
        self.blocks.push(Block::Kv(pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect()));
        self
    }

    /// Adds monospaced text kept as written.
    pub fn preformatted(&mut self, text: impl Into<String>) -> &mut Self {
        self.blocks.push(Block::Pre(text.into()));
        self
    }
}

/// An HTML report: a title and sections.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Report {
    /// Page title and top heading.
    pub title: String,
    /// Sections in order.
    pub sections: Vec<Section>,
    /// Inline images as base64 `data:` URIs instead of linking to them.
    pub embed: bool,
}

impl Report {
    /// An empty report.
    pub fn new(title: impl Into<String>) -> Self {
        Report { title: title.into(), sections: Vec::new(), embed: false }
    }

    /// Sets whether images are inlined as base64 `data:` URIs (default: linked by relative path).
    pub fn embed(&mut self, embed: bool) -> &mut Self {
        self.embed = embed;
        self
    }

    /// Starts a new section and returns it for filling.
    pub fn section(&mut self, heading: impl Into<String>) -> &mut Section {
        self.sections.push(Section { heading: heading.into(), blocks: Vec::new() });
        let last = self.sections.len() - 1;
        &mut self.sections[last]
    }

    /// The page as HTML. With `embed`, images are read from `base` (the report's folder) joined
    /// with their relative path.
    pub fn to_html(&self, base: &Path) -> Result<String> {
        let mut h = String::with_capacity(8192);
        h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
        h.push_str(&format!("<title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n", esc(&self.title)));
        h.push_str(&format!("<h1>{}</h1>\n", esc(&self.title)));
        if self.sections.len() > 2 {
            h.push_str("<nav><ol>\n");
            for (i, s) in self.sections.iter().enumerate() {
                h.push_str(&format!("<li><a href=\"#s{}\">{}</a></li>\n", i + 1, esc(&s.heading)));
            }
            h.push_str("</ol></nav>\n");
        }
        for (i, s) in self.sections.iter().enumerate() {
            h.push_str(&format!("<section id=\"s{}\">\n<h2>{}</h2>\n", i + 1, esc(&s.heading)));
            for b in &s.blocks {
                self.block_html(&mut h, b, base)?;
            }
            h.push_str("</section>\n");
        }
        h.push_str("</main>\n</body>\n</html>\n");
        Ok(h)
    }

    fn block_html(&self, h: &mut String, b: &Block, base: &Path) -> Result<()> {
        match b {
            Block::Paragraph(t) => h.push_str(&format!("<p>{}</p>\n", esc(t))),
            Block::Table { headers, rows } => {
                h.push_str("<div class=\"scroll\"><table>\n<thead><tr>");
                for c in headers {
                    h.push_str(&format!("<th>{}</th>", esc(c)));
                }
                h.push_str("</tr></thead>\n<tbody>\n");
                for r in rows {
                    h.push_str("<tr>");
                    for c in r {
                        if is_number(c) {
                            h.push_str(&format!("<td class=\"num\">{}</td>", esc(c)));
                        } else {
                            h.push_str(&format!("<td>{}</td>", esc(c)));
                        }
                    }
                    h.push_str("</tr>\n");
                }
                h.push_str("</tbody>\n</table></div>\n");
            }
            Block::Image { path, caption } => {
                h.push_str("<figure>");
                self.img_html(h, path, caption, base)?;
                h.push_str("</figure>\n");
            }
            Block::ImagesRow(items) => {
                h.push_str("<div class=\"row\">\n");
                for (path, caption) in items {
                    h.push_str("<figure>");
                    self.img_html(h, path, caption, base)?;
                    h.push_str("</figure>\n");
                }
                h.push_str("</div>\n");
            }
            Block::Kv(pairs) => {
                h.push_str("<dl class=\"kv\">\n");
                for (k, v) in pairs {
                    h.push_str(&format!("<dt>{}</dt><dd>{}</dd>\n", esc(k), esc(v)));
                }
                h.push_str("</dl>\n");
            }
            Block::Pre(t) => h.push_str(&format!("<pre>{}</pre>\n", esc(t))),
        }
        Ok(())
    }

    fn img_html(&self, h: &mut String, path: &str, caption: &str, base: &Path) -> Result<()> {
        let src = if self.embed {
            let file = base.join(path);
            let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
            format!("data:{};base64,{}", mime(path), base64(&bytes))
        } else {
            esc(path)
        };
        let img = format!("<img src=\"{src}\" alt=\"{}\" loading=\"lazy\">", esc(caption));
        if self.embed {
            h.push_str(&img);
        } else {
            // Clicking a linked figure opens it at full size.
            h.push_str(&format!("<a href=\"{}\">{img}</a>", esc(path)));
        }
        if !caption.is_empty() {
            h.push_str(&format!("<figcaption>{}</figcaption>", esc(caption)));
        }
        Ok(())
    }

    /// Writes the page to `path` atomically; linked images are expected beside it, embedded ones
    /// are read from there.
    pub fn write(&self, path: &Path) -> Result<()> {
        let base = path.parent().unwrap_or(Path::new(""));
        let html = self.to_html(base)?;
        derm_core::fsutil::write_atomic(path, html.as_bytes())
    }
}

/// Escapes `&`, `<`, `>`, `"` and `'` for HTML text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Standard base64 (RFC 4648, with `=` padding).
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn mime(path: &str) -> &'static str {
    let lower = path.to_ascii_lowercase();
    if lower.ends_with(".jpg") || lower.ends_with(".jpeg") {
        "image/jpeg"
    } else if lower.ends_with(".svg") {
        "image/svg+xml"
    } else if lower.ends_with(".gif") {
        "image/gif"
    } else if lower.ends_with(".webp") {
        "image/webp"
    } else {
        "image/png"
    }
}

/// Whether a table cell reads as a number (optionally with a trailing `%` or a ± part).
fn is_number(s: &str) -> bool {
    let t = s.trim();
    let t = t.strip_suffix('%').unwrap_or(t).trim();
    let t = t.split('±').next().unwrap_or(t).trim();
    !t.is_empty() && t.parse::<f64>().is_ok()
}

const CSS: &str = r#"
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #ffffff; --soft: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 16px/1.55 -apple-system, "Segoe UI", Helvetica, Arial, "DejaVu Sans", sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 2rem 1.5rem 4rem; }
h1 { font-size: 1.9rem; margin: 0 0 1rem; padding-bottom: .4rem; border-bottom: 2px solid var(--line); }
h2 { font-size: 1.35rem; margin: 2.4rem 0 .8rem; padding-bottom: .25rem; border-bottom: 1px solid var(--line); }
p { margin: .6rem 0; max-width: 75ch; }
a { color: var(--accent); }
nav ol { margin: 0 0 1rem; padding-left: 1.4rem; columns: 2; color: var(--muted); }
.scroll { overflow-x: auto; margin: .8rem 0; }
table { border-collapse: collapse; font-size: .95rem; }
th, td { padding: .35rem .8rem; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { background: var(--soft); font-weight: 600; border-bottom: 2px solid var(--line); }
tbody tr:nth-child(even) td { background: #fbfcfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.kv { display: grid; grid-template-columns: max-content auto; gap: .25rem 1.2rem; margin: .8rem 0; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; font-variant-numeric: tabular-nums; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: .8rem 1rem;
  overflow-x: auto; font: .88rem/1.45 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
figure { margin: 1rem 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .35rem; }
.row { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
.row figure { margin: 0; flex: 1 1 260px; max-width: 520px; }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_known_vectors() {
        assert_eq!(base64(b"Man"), "TWFu");
        assert_eq!(base64(b"Ma"), "TWE=");
        assert_eq!(base64(b"M"), "TQ==");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn text_is_escaped() {
        let mut r = Report::new("a <b> & \"c\"");
        r.section("<script>alert(1)</script>")
            .paragraph("<script>x</script>")
            .table(&["<th>"], vec![vec!["<td>".into()]])
            .kv(vec![("k<", "v>")])
            .preformatted("</pre>");
        let h = r.to_html(Path::new(".")).unwrap();
        assert!(!h.contains("<script>"));
        assert!(h.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(h.contains("a &lt;b&gt; &amp; &quot;c&quot;"));
        assert!(!h.contains("<th><th>") && !h.contains("</pre></pre>"));
        assert!(is_number("0.781") && is_number("12.5%") && is_number("0.8 ± 0.1") && !is_number("MEL"));
    }

    #[test]
    fn writes_headings_and_images() {
        let d = tempfile::tempdir().unwrap();
        let png = crate::plot::grid(&[image::RgbImage::new(4, 4)], 1, 8, None);
        derm_core::image_io::save_png(&d.path().join("fig.png"), &png).unwrap();
        let mut r = Report::new("Run");
        r.section("Training").image("fig.png", "loss");
        r.section("Samples").images_row(vec![("fig.png", "a"), ("fig.png", "b")]);
        let path = d.path().join("report.html");
        r.write(&path).unwrap();
        let h = std::fs::read_to_string(&path).unwrap();
        assert!(h.contains("<h2>Training</h2>") && h.contains("<h2>Samples</h2>"));
        assert_eq!(h.matches("<img src=\"fig.png\"").count(), 3);
        assert!(h.contains("<figcaption>loss</figcaption>"));

        r.embed(true);
        r.write(&path).unwrap();
        let h = std::fs::read_to_string(&path).unwrap();
        assert_eq!(h.matches("<img src=\"data:image/png;base64,iVBORw0KGgo").count(), 3);

        r.section("Missing").image("none.png", "");
        let e = r.write(&path).unwrap_err();
        assert!(e.to_string().contains("none.png"));
    }
}
