//! A small reader for label tables: CSV with quotes, or cells split by another delimiter
//! (PH2's `||` table).

use std::path::{Path, PathBuf};

use derm_core::{Error, Result};

/// A label table: its header and rows, every row as long as the header.
#[derive(Debug, Clone)]
pub struct Table {
    /// The file it was read from.
    pub path: PathBuf,
    /// Column names, trimmed.
    pub header: Vec<String>,
    /// Rows (1-based line number, trimmed cells).
    pub rows: Vec<(usize, Vec<String>)>,
    /// Lines whose cell count differs from the header's (1-based line numbers).
    pub malformed: Vec<usize>,
}

impl Table {
    /// Reads `path`. With the comma delimiter, quoted cells (`"a,b"`, `""` for a quote) are
    /// honoured. With another delimiter, lines without it are not table rows and are skipped.
    pub fn read(path: &Path, delimiter: &str) -> Result<Table> {
        Table::read_with(path, delimiter, None)
    }

    /// Like [`Table::read`]; when `columns` is given the file has no header line and its cells
    /// are named by `columns` (ISIC 2016's ground-truth CSVs are bare `id,label` lines).
    pub fn read_with(path: &Path, delimiter: &str, columns: Option<&[String]>) -> Result<Table> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = String::from_utf8(bytes).map_err(|e| Error::Parse {
            path: path.into(),
            msg: format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
        })?;
        Table::parse(&text, path, delimiter, columns)
    }

    /// Parses table text read from `path` (which names it in errors), as [`Table::read_with`].
    pub fn parse(text: &str, path: &Path, delimiter: &str, columns: Option<&[String]>) -> Result<Table> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let csv = delimiter == ",";
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
            .filter(|(_, l)| !l.trim().is_empty())
            .filter(|(_, l)| csv || l.contains(delimiter));
        let Some(head) = lines.next() else {
            return Err(Error::Parse { path: path.into(), msg: "empty table, no header".into() });
        };
        let split = |l: &str| if csv { split_csv(l) } else { split_delim(l, delimiter) };
        let (header, first) = match columns {
            Some(cols) => (cols.to_vec(), Some(head)),
            None => (split(head.1), None),
        };
        let mut rows = Vec::new();
        let mut malformed = Vec::new();
        for (no, line) in first.into_iter().chain(lines) {
            let cells = split(line);
            if cells.len() == header.len() {
                rows.push((no, cells));
            } else {
                malformed.push(no);
            }
        }
        Ok(Table { path: path.into(), header, rows, malformed })
    }

    /// The index of column `name`, or an error naming the file, the column and the columns
    /// there are.
    pub fn column(&self, name: &str) -> Result<usize> {
        self.header.iter().position(|h| h == name).ok_or_else(|| Error::Parse {
            path: self.path.clone(),
            msg: format!("missing column {name:?} (columns: {})", self.header.join(", ")),
        })
    }

    /// An error naming the file and the first line whose cell count differs from the header's,
    /// for tables that must have none.
    pub fn require_well_formed(&self) -> Result<()> {
        match self.malformed.first() {
            Some(line) => Err(Error::Parse {
                path: self.path.clone(),
                msg: format!("line {line}: not as many cells as the header has ({})", self.header.len()),
            }),
            None => Ok(()),
        }
    }

    /// The number in column `col` of the row `(line, cells)`, which must lie in [0, 1]; else an
    /// error naming the file, the line, the column and `what` it should have been.
    pub fn unit_cell(&self, (line, cells): &(usize, Vec<String>), col: usize, what: &str) -> Result<f64> {
        match cells[col].parse::<f64>() {
            Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
            _ => Err(Error::Parse {
                path: self.path.clone(),
                msg: format!("line {line}: {} {:?} is not {what}", self.header[col], cells[col]),
            }),
        }
    }
}

/// Pairs the rows of two files by id: for each of `base`'s ids in order, the index of the same
/// id in `other`. Both must hold the same ids, each once; the error names the file and an id
/// that breaks it.
pub fn pair_ids(base: &[String], base_path: &Path, other: &[String], other_path: &Path) -> Result<Vec<usize>> {
    let index = |ids: &[String], path: &Path| -> Result<std::collections::HashMap<String, usize>> {
        let mut m = std::collections::HashMap::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            if m.insert(id.clone(), i).is_some() {
                return Err(Error::Parse { path: path.into(), msg: format!("id {id} appears more than once") });
            }
        }
        Ok(m)
    };
    let in_base = index(base, base_path)?;
    let in_other = index(other, other_path)?;
    let pairs = base
        .iter()
        .map(|id| {
            in_other.get(id).copied().ok_or_else(|| Error::Parse {
                path: other_path.into(),
                msg: format!(
                    "no row for id {id}, which {} has: the two must score the same images ({} ids there, {} here)",
                    base_path.display(),
                    base.len(),
                    other.len()
                ),
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    if other.len() > base.len() {
        let extra = other.iter().find(|id| !in_base.contains_key(*id)).map(String::as_str).unwrap_or_default();
        return Err(Error::Parse {
            path: other_path.into(),
            msg: format!(
                "id {extra} is not in {}: the two must score the same images ({} ids there, {} here)",
                base_path.display(),
                base.len(),
                other.len()
            ),
        });
    }
    Ok(pairs)
}

fn split_delim(line: &str, delimiter: &str) -> Vec<String> {
    line.split(delimiter).map(|c| c.trim().to_string()).collect()
}

fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cell.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cell).trim().to_string()),
            _ => cell.push(c),
        }
    }
    out.push(cell.trim().to_string());
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_quotes_bom_and_crlf() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l.csv");
        std::fs::write(&p, "\u{feff}image_id,dx\r\nA,\"x, \"\"y\"\"\"\r\n\r\nB,z\r\nC\r\n").unwrap();
        let t = Table::read(&p, ",").unwrap();
        assert_eq!(t.header, ["image_id", "dx"]);
        assert_eq!(t.rows[0].1, ["A", "x, \"y\""]);
        assert_eq!(t.rows[1], (4, vec!["B".to_string(), "z".to_string()]));
        assert_eq!(t.malformed, [5]);
        let e = t.column("label").unwrap_err().to_string();
        assert!(e.contains("l.csv") && e.contains("\"label\"") && e.contains("image_id, dx"), "{e}");
    }

    #[test]
    fn headerless_table_takes_the_given_column_names() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("gt.csv");
        std::fs::write(&p, "ISIC_0000000,benign\nISIC_0000001,malignant\nbroken\n").unwrap();
        let cols = ["image_id".to_string(), "label".to_string()];
        let t = Table::read_with(&p, ",", Some(&cols)).unwrap();
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[0], (1, vec!["ISIC_0000000".to_string(), "benign".to_string()]));
        assert_eq!(t.malformed, [3]);
        assert_eq!(t.column("label").unwrap(), 1);
        std::fs::write(&p, [0xffu8, 0xfe, 0x00]).unwrap();
        let e = Table::read(&p, ",").unwrap_err().to_string();
        assert!(e.contains("gt.csv") && e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn pairing_by_id_names_the_file_and_the_id() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (a, b) = (Path::new("a.csv"), Path::new("b.csv"));
        assert_eq!(pair_ids(&ids(&["x", "y", "z"]), a, &ids(&["z", "x", "y"]), b).unwrap(), [1, 2, 0]);
        let e = pair_ids(&ids(&["x", "y"]), a, &ids(&["x", "q"]), b).unwrap_err().to_string();
        assert!(e.starts_with("b.csv") && e.contains("id y") && e.contains("a.csv"), "{e}");
        let e = pair_ids(&ids(&["x"]), a, &ids(&["x", "q"]), b).unwrap_err().to_string();
        assert!(e.starts_with("b.csv") && e.contains("id q is not in a.csv"), "{e}");
        let e = pair_ids(&ids(&["x", "x"]), a, &ids(&["x", "x"]), b).unwrap_err().to_string();
        assert!(e.starts_with("a.csv") && e.contains("more than once"), "{e}");
    }

    #[test]
    fn ph2_pipe_table_skips_the_legend() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("PH2_dataset.txt");
        std::fs::write(
            &p,
            "||   Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry | Streaks ||   Colors ||\n\
             || IMD003 ||                        ||                  0 ||   0 | A ||  4 ||\n\
             || IMD009 ||               Melanoma ||                  2 ||   2 | P ||  3 4 ||\n\
             \n\
             Legend:\n\
             Clinical Diagnosis: 0 - Common Nevus; 1 - Atypical Nevus; 2 - Melanoma\n",
        )
        .unwrap();
        let t = Table::read(&p, "||").unwrap();
        let (name, dx) = (t.column("Name").unwrap(), t.column("Clinical Diagnosis").unwrap());
        let got: Vec<(&str, &str)> = t.rows.iter().map(|(_, r)| (r[name].as_str(), r[dx].as_str())).collect();
        assert_eq!(got, [("IMD003", "0"), ("IMD009", "2")]);
    }
}
