//! `misbehave`: a test fixture, never for production. It places like a trivial policy
//! (first live instance, next live one as backup) except for requests whose tenant is
//! `"misbehave"`, where it does what its config string says:
//!
//! - `spin`: loops forever (the gateway's deadline must cut it);
//! - `bomb`: allocates until memory runs out (the gateway's memory cap must stop it);
//! - `trap`: panics, which traps the instance;
//! - `unknown-alias`: answers with an instance index that does not exist;
//! - `dead`: answers with an instance that is not live;
//! - `error`: returns an error;
//! - `sleep`: sleeps for an hour (a WASI wait: the gateway must trap it at once);
//! - `print`: writes a line to stdout and to stderr, then places normally;
//! - `recurse`: recurses without end (wasmtime's stack limit must trap it, on whatever
//!   thread the gateway calls it from).
//!
//! The config `refuse` makes `configure` fail, so the plugin is refused at load.

use std::cell::RefCell;

wit_bindgen::generate!({ path: "../../wit", world: "placement" });

thread_local! {
    static MODE: RefCell<String> = RefCell::default();
    static HOARD: RefCell<Vec<Vec<u8>>> = RefCell::default();
}

struct Misbehave;

impl Guest for Misbehave {
    fn configure(config: String) -> Result<(), String> {
        let mode = config.trim();
        match mode {
            "spin" | "bomb" | "trap" | "unknown-alias" | "dead" | "error" | "sleep" | "print"
            | "recurse" => {
                MODE.with_borrow_mut(|m| *m = mode.to_string());
                Ok(())
            }
            "refuse" => Err("refused on purpose".into()),
            other => Err(format!("unknown mode {other:?}")),
        }
    }

    fn set_instances(_instances: Vec<Instance>) {}

    fn place(request: Request, loads: Vec<Load>, _exclude: Vec<u32>) -> Result<Choice, String> {
        if request.tenant.as_deref() == Some("misbehave") {
            match MODE.with_borrow(|m| m.clone()).as_str() {
                "spin" => {
                    let mut n = 0u64;
                    loop {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                }
                "bomb" => loop {
                    HOARD.with_borrow_mut(|h| h.push(vec![1u8; 1 << 20]));
                },
                "trap" => panic!("misbehave: trap on purpose"),
                "sleep" => std::thread::sleep(std::time::Duration::from_secs(3600)),
                "recurse" => {
                    std::hint::black_box(deeper(std::hint::black_box(0u64)));
                }
                "print" => {
                    println!("misbehave: a line on stdout");
                    eprintln!("misbehave: a line on stderr");
                }
                "unknown-alias" => {
                    return Ok(Choice {
                        main: loads.len() as u32 + 7,
                        backup: None,
                    })
                }
                "dead" => {
                    if let Some(i) = loads.iter().position(|l| !l.live) {
                        return Ok(Choice {
                            main: i as u32,
                            backup: None,
                        });
                    }
                }
                _ => return Err("misbehave: error on purpose".into()),
            }
        }
        let mut live = (0..loads.len() as u32).filter(|&i| loads[i as usize].live);
        let main = live.next().ok_or("no live instance")?;
        Ok(Choice {
            main,
            backup: live.next(),
        })
    }
}

/// Recursion that the optimiser cannot turn into a loop (each frame uses the result of the
/// next) and that keeps nothing in linear memory, so it is the Wasm call stack that runs
/// out, not the guest's own stack in its memory.
#[inline(never)]
#[allow(unconditional_recursion)]
fn deeper(n: u64) -> u64 {
    deeper(n.wrapping_add(1)).rotate_left(1) ^ n
}

export!(Misbehave);
