//! The render child writes nothing to its caller's stderr (a Postgres backend's is the server log):
//! a template that runs out of memory is the caller's error to report, not a line in the log saying
//! that an allocation failed. A test binary of its own, as it points this process's stderr at a file
//! while the render runs.

use std::io::Read;
use std::os::fd::AsRawFd;

use herald_render::sandbox::render_fields;
use herald_render::{Undefined, Vars};
use serde_json::json;

#[test]
fn a_render_out_of_memory_writes_nothing_to_stderr() {
    let mut t = String::from("{% set s = \"12345678\" %}");
    for _ in 0..28 {
        t.push_str("{% set s = s ~ s %}");
    }
    t.push_str("{{ s|length }}");
    let fields = vec![("html".to_string(), json!(t))];
    let vars = Vars::from_payload("acme", &json!({"contact": {"email": "ann@example.com"}}));

    let path = std::env::temp_dir().join(format!("herald-render-stderr-{}", std::process::id()));
    let file = std::fs::File::create(&path).expect("a temporary file");
    // SAFETY: fd 2 is saved, pointed at the file for the render, and put back.
    let saved = unsafe { libc::dup(2) };
    assert!(saved >= 0);
    unsafe { libc::dup2(file.as_raw_fd(), 2) };
    let result = render_fields(&fields, &vars, Undefined::Fail, || {});
    unsafe {
        libc::dup2(saved, 2);
        libc::close(saved);
    }

    let e = result.expect_err("the render runs out of memory");
    assert!(e.contains("more than 512 MiB of memory"), "{e}");
    let mut written = String::new();
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_string(&mut written))
        .expect("the file reads");
    let _ = std::fs::remove_file(&path);
    assert_eq!(written, "", "the child wrote to stderr");
}
