//! Smoke test of `memslots perf`: runs the (hidden) `--tiny` mode with JSON
//! and SVG output and checks the tables, the documented JSON fields and that
//! the SVG is well-formed XML with plot lines.

use std::process::Command;

/// A minimal XML well-formedness check: balanced, properly nested tags,
/// quoted attribute values, known or numeric entities, one root element.
fn check_xml(text: &str) -> Result<(), String> {
    let mut stack: Vec<String> = Vec::new();
    let mut roots = 0;
    let mut rest = text;
    let check_entities = |s: &str| -> Result<(), String> {
        let mut t = s;
        while let Some(i) = t.find('&') {
            let after = &t[i + 1..];
            let end = after.find(';').ok_or_else(|| format!("unterminated entity in {s:?}"))?;
            let name = &after[..end];
            let ok = matches!(name, "amp" | "lt" | "gt" | "quot" | "apos")
                || (name.starts_with('#') && name.len() > 1 && name[1..].chars().all(|c| c.is_ascii_alphanumeric()));
            if !ok {
                return Err(format!("bad entity &{name};"));
            }
            t = &after[end..];
        }
        Ok(())
    };
    while let Some(lt) = rest.find('<') {
        let text_part = &rest[..lt];
        if stack.is_empty() && !text_part.trim().is_empty() {
            return Err(format!("text outside the root: {text_part:?}"));
        }
        check_entities(text_part)?;
        rest = &rest[lt..];
        if let Some(r) = rest.strip_prefix("<?") {
            let end = r.find("?>").ok_or("unterminated <?")?;
            rest = &r[end + 2..];
            continue;
        }
        if let Some(r) = rest.strip_prefix("<!--") {
            let end = r.find("-->").ok_or("unterminated comment")?;
            rest = &r[end + 3..];
            continue;
        }
        // Find the end of the tag, skipping quoted attribute values.
        let mut quote: Option<char> = None;
        let mut end = None;
        for (i, c) in rest.char_indices().skip(1) {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' => quote = Some(c),
                None if c == '<' => return Err("'<' inside a tag".into()),
                None if c == '>' => {
                    end = Some(i);
                    break;
                }
                None => {}
            }
        }
        let end = end.ok_or("unterminated tag")?;
        let tag = &rest[1..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop().ok_or_else(|| format!("</{name}> without an opening tag"))?;
            if open != name.trim() {
                return Err(format!("<{open}> closed by </{name}>"));
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let body = tag.trim_end_matches('/');
        let name: String = body.chars().take_while(|c| !c.is_whitespace()).collect();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':' || c == '_') {
            return Err(format!("bad tag name in <{tag}>"));
        }
        // Attributes: name="value" pairs.
        let mut attrs = body[name.len()..].trim();
        while !attrs.is_empty() {
            let eq = attrs.find('=').ok_or_else(|| format!("attribute without value in <{tag}>"))?;
            let q = attrs[eq + 1..].chars().next().ok_or("attribute without value")?;
            if q != '"' && q != '\'' {
                return Err(format!("unquoted attribute in <{tag}>"));
            }
            let value_end = attrs[eq + 2..].find(q).ok_or("unterminated attribute")?;
            check_entities(&attrs[eq + 2..eq + 2 + value_end])?;
            attrs = attrs[eq + 2 + value_end + 1..].trim_start();
        }
        if stack.is_empty() {
            roots += 1;
        }
        if !self_closing {
            stack.push(name);
        }
    }
    if !rest.trim().is_empty() {
        return Err("text after the root".into());
    }
    if let Some(open) = stack.pop() {
        return Err(format!("<{open}> never closed"));
    }
    if roots != 1 {
        return Err(format!("{roots} root elements"));
    }
    Ok(())
}

#[test]
fn xml_checker_rejects_broken_documents() {
    assert!(check_xml("<svg><g></g></svg>").is_ok());
    assert!(check_xml(r#"<?xml version="1.0"?><svg a="1 &amp; 2"><line/></svg>"#).is_ok());
    assert!(check_xml("<svg><g></svg>").is_err());
    assert!(check_xml("<svg a=1></svg>").is_err());
    assert!(check_xml("<svg>a & b</svg>").is_err());
    assert!(check_xml("<svg></svg><svg></svg>").is_err());
}

#[test]
fn perf_tiny_writes_tables_json_and_svg() {
    let dir = std::env::temp_dir().join(format!("memslots-perf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json_path = dir.join("perf.json");
    let svg_path = dir.join("perf.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_memslots"))
        .args(["perf", "--tiny", "--json"])
        .arg(&json_path)
        .arg("--svg")
        .arg(&svg_path)
        .output()
        .expect("run memslots perf");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);

    for heading in [
        "memslots perf (tiny)",
        "Micro sweep: the benchmark harness",
        "memslots bench harness (tiny mode)",
        "== 1. Random gfn->hva lookups, one thread",
        "== 2. The same lookups on two threads at once",
        "== 3. Updates",
        "== Verdicts (from the medians above) ==",
        "Scenarios (memslot_perf_test)",
        "Targets (lookups and updates at",
    ] {
        assert!(stdout.contains(heading), "missing heading {heading:?} in:\n{stdout}");
    }
    // The other issues' targets appear beside the peers they are measured against.
    for word in ["mark_page_dirty", "dirty ring push", "harvest", "read_obj", "64 KiB copy", "memcpy"] {
        assert!(stdout.contains(word), "missing target {word:?} in:\n{stdout}");
    }
    for word in
        [" create ", " move ", " flags ", " delete ", " build ", "vm-memory", "ArcSwap<imbl::OrdMap>", "lower bound"]
    {
        assert!(stdout.contains(word), "missing {word:?} in:\n{stdout}");
    }
    // The harness's build line says how this binary was built and where the
    // user-crate figure comes from.
    assert!(stdout.contains("build:   profile "), "no build line in:\n{stdout}");
    assert!(
        stdout.contains("cargo run --release --manifest-path bench/Cargo.toml"),
        "no pointer to bench/ in:\n{stdout}"
    );
    assert!(["PASS ", "FAIL ", "SKIP "].iter().any(|v| stdout.contains(v)), "no verdicts in:\n{stdout}");
    for scenario in ["map", "unmap", "unmap-chunked", "move-active", "move-inactive", "rw"] {
        assert!(stdout.contains(&format!(" {scenario} ")), "missing scenario {scenario} in:\n{stdout}");
    }
    // The terms are explained, or pointed to.
    assert!(stdout.contains("Terms: micro sweep = "), "no glossary in:\n{stdout}");
    assert!(stdout.contains("crates/memslots-cli/src/perf/README.md"), "no pointer to the README in:\n{stdout}");
    assert!(stdout.contains("iter min–max"), "no spread of the scenarios in:\n{stdout}");
    let kvm = std::path::Path::new("/dev/kvm").exists();
    if kvm {
        // The kernel's ioctl among the harness's updates, with its spread.
        assert!(
            stdout.lines().any(|l| l.contains(" create  kvm: KVM_SET_USER_MEMORY_REGION") && l.contains('-')),
            "no kvm update row in:\n{stdout}"
        );
        assert!(stdout.lines().any(|l| l.contains(" flags   kvm: ")), "no kvm flags row in:\n{stdout}");
    }
    if !kvm {
        assert!(stdout.contains("skipped: kvm: /dev/kvm not available"), "no skip note in:\n{stdout}");
    }

    // JSON: the documented fields.
    let text = std::fs::read_to_string(&json_path).expect("json written");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(v["schema_version"], 2);
    assert_eq!(v["mode"], "tiny");
    assert!(v["runtime_s"].as_f64().is_some_and(|s| s > 0.0));
    assert!(v["host"]["kvm"].is_boolean());
    assert!(v["host"]["cpus"].as_u64().is_some_and(|c| c >= 1));
    assert!(v["skipped"].is_array());
    // The harness's own report, as bench/ writes it.
    for field in ["machine", "plan", "lookups", "two_threads", "updates", "verdicts", "seconds"] {
        assert!(!v["harness"][field].is_null(), "harness without {field}");
    }
    assert!(v["harness"]["verdicts"].as_array().is_some_and(|a| a.len() == 9), "nine verdicts");
    let micro = v["micro"].as_array().expect("micro array");
    assert!(!micro.is_empty());
    for p in micro {
        for field in ["metric", "implementation", "slots", "median_ns", "min_ns", "max_ns", "samples"] {
            assert!(!p[field].is_null(), "micro point without {field}: {p}");
        }
        let (lo, mid, hi) =
            (p["min_ns"].as_f64().unwrap(), p["median_ns"].as_f64().unwrap(), p["max_ns"].as_f64().unwrap());
        assert!(lo <= mid && mid <= hi, "min <= median <= max: {p}");
        assert!(p["median_ns"].as_f64().is_some_and(|x| x > 0.0), "non-positive time: {p}");
    }
    for (metric, imp) in [
        ("lookup_random", "memslots"),
        ("lookup_random", "vm-memory"),
        ("move", "vm-memory-atomic"),
        ("flags", "memslots"),
    ] {
        assert!(micro.iter().any(|p| p["metric"] == metric && p["implementation"] == imp), "no {metric}/{imp} point");
    }
    if kvm && v["host"]["kvm"] == true {
        assert!(micro.iter().any(|p| p["implementation"] == "kvm"), "kvm available but no kvm points");
    }
    let scenarios = v["scenarios"].as_array().expect("scenarios array");
    for p in scenarios {
        for field in [
            "backend",
            "scenario",
            "slots",
            "area_bytes",
            "vcpus",
            "setup_ms",
            "iterations",
            "iter_median_us",
            "iter_mean_us",
            "iter_min_us",
            "iter_max_us",
            "vcpu_accesses",
            "vcpu_misses",
        ] {
            assert!(!p[field].is_null(), "scenario point without {field}: {p}");
        }
    }
    assert!(scenarios.iter().any(|p| p["backend"] == "library" && p["scenario"] == "move-active"));
    let targets = v["targets"].as_array().expect("targets array");
    // 8 lookup/update targets, 6 dirty-logging and guest-memory ones, and one
    // backend comparison per size where /dev/kvm exists (1 in --tiny).
    let kvm = memslots_kvm::kvm_available();
    assert_eq!(targets.len(), if kvm { 16 } else { 15 }, "{targets:?}");
    for t in targets {
        for field in ["name", "slots", "goal_ns", "memslots_ns", "met", "peers", "peer_ranges"] {
            assert!(t.get(field).is_some(), "target without {field}: {t}");
        }
    }

    // SVG: well-formed, with plot lines.
    let svg = std::fs::read_to_string(&svg_path).expect("svg written");
    check_xml(&svg).unwrap_or_else(|e| panic!("SVG is not well-formed: {e}"));
    assert!(svg.contains("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.matches("<polyline").count() >= 8, "too few polylines");
    let _ = std::fs::remove_dir_all(&dir);
}
