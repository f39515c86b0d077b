//! How every `vkv bench` command and `vkv frag` hand over what they measured: the whole report
//! as pretty-printed JSON on stdout (`--json`), or the command's own table. One function, so the
//! choice reads the same everywhere and JSON is always the serialized report, nothing else.

use serde::Serialize;

/// Print `report` on stdout: as pretty JSON when `json`, else through `print_table`.
pub fn emit<R: Serialize + ?Sized>(
    report: &R,
    json: bool,
    print_table: impl FnOnce(&R),
) -> serde_json::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print_table(report);
    }
    Ok(())
}
