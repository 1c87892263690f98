//! The config loader takes any text: it returns a config or errors, each naming the
//! file and a line and column inside the text; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssegate::config::Config;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let path = std::path::Path::new("/nonexistent/fuzz/ssegate.toml");
    if let Err(errors) = Config::from_str(text, path) {
        let lines = text.split('\n').count();
        assert!(!errors.0.is_empty());
        for e in &errors.0 {
            assert_eq!(e.file, path);
            // Line 0: an error about the whole file (a missing section).
            assert!(e.line <= lines, "line {} of {lines}: {e}", e.line);
            assert!(!e.to_string().is_empty());
        }
    }
});
