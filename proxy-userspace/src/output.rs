//! How the operator commands print (`list`, `conntrack list`), as kubectl and
//! cilium-dbg offer it: `-o text` (the default, ipvsadm-like), `wide` (more columns),
//! `json`, `yaml`. An empty table says so in text (on stderr, as kubectl's "No
//! resources found", so that a pipe counting lines counts none); in json and yaml it
//! is an empty list.

use std::io::Write;

use anyhow::Result;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Wide,
    Json,
    Yaml,
}

/// The output flags of a command.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct OutputArgs {
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    output: Format,
    /// The same as `-o json` (kept for scripts written against earlier versions).
    #[arg(long, hide = true)]
    json: bool,
}

impl OutputArgs {
    pub fn format(self) -> Format {
        if self.json {
            Format::Json
        } else {
            self.output
        }
    }
}

/// One document (the whole `list`) in `format`; `text` renders the text forms
/// (`true`: wide).
pub fn document<T: Serialize>(
    value: &T,
    format: Format,
    text: impl FnOnce(bool) -> String,
) -> Result<String> {
    Ok(match format {
        Format::Text => text(false),
        Format::Wide => text(true),
        Format::Json => serde_json::to_string_pretty(value)? + "\n",
        Format::Yaml => yaml(value)?,
    })
}

/// YAML with the structure of the JSON form: through a JSON value, so that enums
/// become mappings as in JSON rather than YAML tags (`!Address …`), which few YAML
/// readers expect.
fn yaml<T: Serialize>(value: &T) -> Result<String> {
    Ok(serde_yaml::to_string(&serde_json::to_value(value)?)?)
}

/// A table written record by record as it is read (a JSON array, a YAML sequence),
/// so that a table of a million flows shows at once and is never held whole.
pub struct Stream<W: Write> {
    out: W,
    format: Format,
    written: usize,
}

impl<W: Write> Stream<W> {
    pub fn start(out: W, format: Format) -> Stream<W> {
        Stream {
            out,
            format,
            written: 0,
        }
    }

    /// One record; `line` renders its text forms (`true`: wide).
    pub fn record<T: Serialize>(
        &mut self,
        record: &T,
        line: impl FnOnce(bool) -> String,
    ) -> Result<()> {
        let first = self.written == 0;
        match self.format {
            Format::Json => {
                let opening = if first { "[\n" } else { ",\n" };
                write!(self.out, "{opening}{}", serde_json::to_string(record)?)?;
            }
            Format::Yaml => write!(self.out, "{}", yaml(&[record])?)?,
            Format::Text => writeln!(self.out, "{}", line(false))?,
            Format::Wide => writeln!(self.out, "{}", line(true))?,
        }
        self.written += 1;
        Ok(())
    }

    /// Ends the table; `nothing` says that it is empty (text forms).
    pub fn finish(mut self, nothing: &str) -> Result<()> {
        match (self.format, self.written) {
            (Format::Json | Format::Yaml, 0) => writeln!(self.out, "[]")?,
            (Format::Json, _) => writeln!(self.out, "\n]")?,
            (Format::Text | Format::Wide, 0) => eprintln!("{nothing}"),
            _ => {}
        }
        self.out.flush()?;
        Ok(())
    }
}
