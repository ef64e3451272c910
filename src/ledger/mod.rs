//! The application services: recording, reading and reporting on the
//! ledger, independent of HTTP so the CLI and the bench share them.

pub mod consents;
pub mod keys;
pub mod policies;
pub mod reconciliation;
pub mod reports;
pub mod transfers;

/// A text cell of a CSV download, safe to open in a spreadsheet: a cell
/// starting with `=`, `+`, `-`, `@`, a tab or a carriage return would run as
/// a formula there (a carrier chooses its call ids), so it gets a leading
/// `'`, as OWASP's CSV-injection guidance has it. Only a text that may
/// start with one of those goes through here: a count never does.
pub(crate) fn csv_text(cell: &str) -> std::borrow::Cow<'_, str> {
    match cell.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{cell}").into(),
        _ => cell.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::csv_text;

    #[test]
    fn csv_cells_that_a_spreadsheet_would_run_are_neutralized() {
        for cell in [
            "=HYPERLINK(\"x\")",
            "+SUM(1+1)",
            "-2+3",
            "@cmd",
            "\t=1",
            "\r=1",
        ] {
            assert_eq!(csv_text(cell), format!("'{cell}"));
        }
        for cell in ["call-1", "", "a=b", "carrier-a", "'quoted"] {
            assert_eq!(csv_text(cell), cell);
        }
    }
}
