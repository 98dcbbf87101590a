//! The demo of `cargo xtask run`, end to end: the lab with BGP from BIRD, a firewall, a
//! steer policy and a deny between segments; the counters move, and `xnet top` shows them.

#[test]
fn the_demo_forwards_steers_and_denies_and_top_shows_it() {
    if !xnet_lab::testkit::require_root("the_demo_forwards_steers_and_denies_and_top_shows_it") {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let screen = rt
        .block_on(xnet_lab::demo::run(Some(4)))
        .expect("the demo")
        .expect("the screen of xnet top");
    // Rates, not only totals: the traffic is running while top samples. A row from its
    // first word on (two tables share a line).
    let line = |start: &str| {
        let l = screen
            .lines()
            .find(|l| l.trim_start().starts_with(start) || l.contains(&format!(" {start}")))
            .unwrap_or_else(|| panic!("no line {start:?} in:\n{screen}"));
        let at = if l.trim_start().starts_with(start) {
            0
        } else {
            l.find(&format!(" {start}")).unwrap() + 1
        };
        l[at..]
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let rate = |s: &str| -> f64 {
        let (n, k) = match s.strip_suffix('k') {
            Some(n) => (n, 1e3),
            None => (s, 1.0),
        };
        n.parse::<f64>().unwrap_or(0.0) * k
    };
    let vnet1 = line("vnet1");
    assert_eq!(&vnet1[1..3], ["prod", "native"], "{screen}");
    assert!(rate(&vnet1[5]) > 10.0, "vnet1 forwards: {screen}");
    assert!(rate(&line("steered")[2]) > 10.0, "steered: {screen}");
    assert!(rate(&line("drop_policy")[2]) > 1.0, "denied: {screen}");
    let rule = line("vnet-icmp-via-fw");
    assert_eq!(&rule[1..4], ["prod", "steer", "fw"], "{screen}");
    assert!(rate(&rule[4]) > 10.0, "{screen}");
    assert_eq!(line("onprem")[0], "onprem");
    assert!(screen.contains("Established"), "{screen}");
    let fw: Vec<&str> = screen
        .lines()
        .find(|l| l.starts_with("fw "))
        .expect("the firewall service's row")
        .split_whitespace()
        .collect();
    assert_eq!(&fw[1..4], ["fw1", "10.0.11.2", "up"], "{screen}");
    eprintln!("{screen}");
}
