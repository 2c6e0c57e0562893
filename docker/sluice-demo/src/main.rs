//! `sluice-demo`: the workload of the compose demo (docker/compose.yaml),
//! so that the demo needs no image from a registry. `upstream` is the
//! demo's upstream (200 and the Host it was asked as); `agent` is the demo
//! "AI agent" (one allowed and one denied request per round, through the
//! gateway, printing what came back); `as-user` runs a program as another
//! user, for the transparent agent's container, which starts as root to
//! install its REDIRECT rules. Standard library only: docker/build.sh
//! --demo builds it statically and its image holds nothing else.
#![forbid(unsafe_code)]

mod agent;
mod http;
mod upstream;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use http::Url;

const USAGE: &str = "\
usage:
  sluice-demo upstream [--listen ADDR]
      answers every HTTP/1.1 request with 200 and a body naming its Host
      (default --listen 0.0.0.0:80)
  sluice-demo agent [--proxy URL | --direct] [--interval SECS] [--rounds N] [--wait SECS] URL...
      every --interval seconds (default 10), GETs each URL and prints what
      came back; through --proxy (default: $HTTP_PROXY, else $http_proxy),
      or directly with --direct or no proxy set. --rounds 0 (the default)
      runs for ever. Until a first request reaches something, failures to
      resolve or connect are retried each second for --wait seconds
      (default 120), then it exits 1.
  sluice-demo as-user UID:GID PROGRAM [ARG...]
      runs PROGRAM as UID:GID with no supplementary groups (from root: the
      capabilities go with the change of user)
  sluice-demo --version";

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Upstream {
        listen: SocketAddr,
    },
    Agent(AgentArgs),
    AsUser {
        uid: u32,
        gid: u32,
        program: String,
        args: Vec<String>,
    },
    Version,
    Help,
}

/// The agent's arguments before they become [`agent::Args`] (kept apart
/// so parsing is tested without a network).
#[derive(Debug, PartialEq, Eq)]
struct AgentArgs {
    urls: Vec<Url>,
    proxy: Option<Url>,
    interval: u64,
    rounds: u64,
    wait: u64,
}

/// Parses the command line; `env` looks up an environment variable.
fn parse(args: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Command, String> {
    let mut it = args.iter().map(String::as_str);
    let sub = it.next().ok_or("no command given")?;
    let rest: Vec<&str> = it.collect();
    if sub == "as-user" {
        // Everything after UID:GID belongs to the program.
        let (Some(ids), Some(program)) = (rest.first(), rest.get(1)) else {
            return Err("as-user: give UID:GID and a program".to_owned());
        };
        let (uid, gid) = ids
            .split_once(':')
            .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
            .ok_or_else(|| format!("as-user: not UID:GID: {ids}"))?;
        return Ok(Command::AsUser {
            uid,
            gid,
            program: (*program).to_owned(),
            args: rest[2..].iter().map(|a| (*a).to_owned()).collect(),
        });
    }
    // `--flag value` pairs and positional arguments.
    let mut flags: Vec<(&str, &str)> = Vec::new();
    let mut positional = Vec::new();
    let mut switches = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        let a = rest[i];
        if a == "--direct" {
            switches.push(a);
        } else if a.starts_with("--") {
            let (k, v) = match a.split_once('=') {
                Some((k, v)) => (k, v),
                None => {
                    i += 1;
                    (a, *rest.get(i).ok_or_else(|| format!("{a} needs a value"))?)
                }
            };
            flags.push((k, v));
        } else {
            positional.push(a);
        }
        i += 1;
    }
    let number = |name: &str, v: &str| v.parse::<u64>().map_err(|_| format!("{name}: not a whole number: {v}"));
    match sub {
        "--version" | "-V" | "version" => Ok(Command::Version),
        "--help" | "-h" | "help" => Ok(Command::Help),
        "upstream" => {
            let mut listen = SocketAddr::from(([0, 0, 0, 0], 80));
            for (k, v) in flags {
                match k {
                    "--listen" => listen = v.parse().map_err(|_| format!("--listen: not an address: {v}"))?,
                    _ => return Err(format!("upstream: unknown option {k}")),
                }
            }
            if let Some(p) = positional.first().or(switches.first()) {
                return Err(format!("upstream: unexpected argument {p}"));
            }
            Ok(Command::Upstream { listen })
        }
        "agent" => {
            let mut a = AgentArgs {
                urls: Vec::new(),
                proxy: None,
                interval: 10,
                rounds: 0,
                wait: 120,
            };
            let mut proxy_flag = None;
            for (k, v) in flags {
                match k {
                    "--proxy" => proxy_flag = Some(v.to_owned()),
                    "--interval" => a.interval = number(k, v)?,
                    "--rounds" => a.rounds = number(k, v)?,
                    "--wait" => a.wait = number(k, v)?,
                    _ => return Err(format!("agent: unknown option {k}")),
                }
            }
            let direct = switches.contains(&"--direct");
            if direct && proxy_flag.is_some() {
                return Err("agent: --proxy and --direct exclude each other".to_owned());
            }
            let proxy = if direct {
                None
            } else {
                proxy_flag
                    .or_else(|| env("HTTP_PROXY"))
                    .or_else(|| env("http_proxy"))
                    .filter(|p| !p.is_empty())
            };
            a.proxy = proxy
                .map(|p| p.parse::<Url>().map_err(|e| format!("agent: the proxy: {e}")))
                .transpose()?;
            if positional.is_empty() {
                return Err("agent: give at least one URL".to_owned());
            }
            a.urls = positional
                .iter()
                .map(|u| u.parse::<Url>().map_err(|e| format!("agent: {e}")))
                .collect::<Result<_, _>>()?;
            if a.interval == 0 {
                return Err("agent: --interval must be at least 1".to_owned());
            }
            Ok(Command::Agent(a))
        }
        other => Err(format!("unknown command {other}")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match parse(&args, |k| std::env::var(k).ok()) {
        Ok(Command::Version) => {
            println!("sluice-demo {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Ok(Command::Help) => {
            println!("{USAGE}");
            Ok(())
        }
        Ok(Command::Upstream { listen }) => upstream::run(listen),
        Ok(Command::AsUser {
            uid,
            gid,
            program,
            args,
        }) => {
            use std::os::unix::process::CommandExt;
            // std sets the group, drops supplementary groups (when root)
            // and then the user before exec; exec returns only on failure.
            let e = std::process::Command::new(&program)
                .args(&args)
                .uid(uid)
                .gid(gid)
                .exec();
            Err(format!("as-user: cannot run {program} as {uid}:{gid}: {e}"))
        }
        Ok(Command::Agent(a)) => agent::run(&agent::Args {
            urls: a.urls,
            proxy: a.proxy,
            interval: Duration::from_secs(a.interval),
            rounds: a.rounds,
            wait: Duration::from_secs(a.wait),
        }),
        Err(e) => {
            eprintln!("sluice-demo: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn upstream_defaults_to_port_80() {
        assert_eq!(
            parse(&args("upstream"), no_env),
            Ok(Command::Upstream {
                listen: "0.0.0.0:80".parse().unwrap()
            })
        );
        assert_eq!(
            parse(&args("upstream --listen=127.0.0.1:8080"), no_env),
            Ok(Command::Upstream {
                listen: "127.0.0.1:8080".parse().unwrap()
            })
        );
        assert!(parse(&args("upstream --listen nowhere"), no_env).is_err());
        assert!(parse(&args("upstream extra"), no_env).is_err());
    }

    #[test]
    fn agent_takes_its_proxy_from_the_environment_unless_told() {
        let env = |k: &str| (k == "HTTP_PROXY").then(|| "http://gateway-proxy:3128".to_owned());
        let Ok(Command::Agent(a)) = parse(
            &args("agent http://api.demo.internal/ http://blocked.demo.internal/"),
            env,
        ) else {
            panic!("not an agent command");
        };
        assert_eq!(a.proxy, Some("http://gateway-proxy:3128".parse().unwrap()));
        assert_eq!(a.urls.len(), 2);
        assert_eq!((a.interval, a.rounds, a.wait), (10, 0, 120));

        let Ok(Command::Agent(a)) = parse(&args("agent --direct --rounds 1 --wait 5 http://x/"), env) else {
            panic!("not an agent command");
        };
        assert_eq!((a.proxy, a.rounds, a.wait), (None, 1, 5));

        let Ok(Command::Agent(a)) = parse(&args("agent --proxy http://p:1 http://x/"), env) else {
            panic!("not an agent command");
        };
        assert_eq!(a.proxy, Some("http://p:1".parse().unwrap()));
    }

    #[test]
    fn as_user_leaves_the_programs_arguments_alone() {
        assert_eq!(
            parse(
                &args("as-user 10001:10002 /sluice-demo agent --direct http://x/"),
                no_env
            ),
            Ok(Command::AsUser {
                uid: 10001,
                gid: 10002,
                program: "/sluice-demo".to_owned(),
                args: args("agent --direct http://x/"),
            })
        );
        for bad in ["as-user", "as-user 10001:10001", "as-user 10001 /x", "as-user a:b /x"] {
            assert!(parse(&args(bad), no_env).is_err(), "{bad}");
        }
    }

    #[test]
    fn agent_refusals() {
        for bad in [
            "agent",
            "agent --interval 0 http://x/",
            "agent --interval soon http://x/",
            "agent --proxy http://p:1 --direct http://x/",
            "agent --proxy socks5://p http://x/",
            "agent https://x/",
            "agent --rounds",
            "agent --colour blue http://x/",
            "fly",
        ] {
            assert!(parse(&args(bad), no_env).is_err(), "{bad}");
        }
        assert!(parse(&[], no_env).is_err());
    }
}
