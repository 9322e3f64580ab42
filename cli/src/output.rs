//! Printing results as a table, JSON or YAML (`-o`), kubectl-style.

use clap::ValueEnum;
use serde_json::Value;

/// Output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns.
    #[default]
    Table,
    /// A JSON document.
    Json,
    /// A YAML document.
    Yaml,
}

/// Prints `items` (JSON objects): as a table of `columns` (header, JSON
/// field), or whole as `{"items": [...]}` in JSON/YAML.
pub fn print_items(
    format: Format,
    columns: &[(&str, &str)],
    items: &[Value],
) -> anyhow::Result<()> {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "items": items }))?
        ),
        Format::Yaml => print!(
            "{}",
            serde_yaml::to_string(&serde_json::json!({ "items": items }))?
        ),
        Format::Table => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|item| {
                    columns
                        .iter()
                        .map(|(_, field)| cell(item.get(*field)))
                        .collect()
                })
                .collect();
            let header: Vec<String> = columns.iter().map(|(h, _)| h.to_string()).collect();
            print!("{}", table(&header, &rows));
        }
    }
    Ok(())
}

/// Prints one document in JSON or YAML; for tables, the caller prints its own text.
pub fn print_value(format: Format, value: &Value) -> anyhow::Result<()> {
    match format {
        Format::Yaml => print!("{}", serde_yaml::to_string(value)?),
        _ => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "<none>".into(),
        Some(Value::String(s)) if s.is_empty() => "<none>".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| cell(Some(x)))
            .collect::<Vec<_>>()
            .join(","),
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(Some(v))))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

/// Renders aligned columns separated by three spaces, as kubectl does.
pub fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in rows {
        for (i, c) in row.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: &[String]| {
        let mut s = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("   ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(header);
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_align_and_empty_cells_read_none() {
        let out = table(
            &["NAME".into(), "IP".into()],
            &[
                vec!["node-1".into(), "10.99.0.11".into()],
                vec!["n2".into(), cell(None)],
            ],
        );
        assert_eq!(out, "NAME     IP\nnode-1   10.99.0.11\nn2       <none>\n");
    }
}
