//! Embeds every OpenCL C source in `cl/` into the library as a generated table
//! (`$OUT_DIR/cl_sources.rs`), with `rerun-if-changed` per file so editing a kernel rebuilds.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new("cl");
    println!("cargo:rerun-if-changed=cl");
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.retain(|p| p.extension().is_some_and(|x| x == "cl"));
    entries.sort();
    let mut table =
        String::from("/// OpenCL C sources embedded from `cl/`: (file name, source).\n");
    table.push_str("pub static CL_SOURCES: &[(&str, &str)] = &[\n");
    for p in &entries {
        println!("cargo:rerun-if-changed={}", p.display());
        let abs = std::fs::canonicalize(p).expect("canonical path of a cl source");
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 file name");
        writeln!(
            table,
            "    ({name:?}, include_str!({:?})),",
            abs.display().to_string()
        )
        .expect("write to string");
    }
    table.push_str("];\n");
    let out =
        Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR set by cargo")).join("cl_sources.rs");
    std::fs::write(out, table).expect("write generated cl table");
}
