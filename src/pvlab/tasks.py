"""The Invoke tasks: thin wrappers that parse options and call the pvlab modules.

Every task takes -q/--quiet and -v/--verbose, and turns a PvlabError into one line
on stderr and a non-zero exit.
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from invoke import Collection, Exit, Task, task

from pvlab import domain
from pvlab import settings as settings_mod
from pvlab.errors import ImageError, PvlabError
from pvlab.settings import PROJECT_ROOT

log = logging.getLogger("pvlab")
_STARTED = time.monotonic()

QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
VERBOSITY_HELP = {
    "quiet": "Print no progress lines, only results, warnings and errors.",
    "verbose": "Show every command run (ssh, xl, ansible, ...) and a traceback on "
    "errors.",
}
SHORT_FLAGS = {"quiet": "q", "verbose": "v"}
# Chosen by `pvlab -q`/`pvlab -v` for the tasks of that run. Kept in this process
# rather than in the environment, so that commands a task starts (pytest, and
# the `invoke` runs of the tests) keep their own default.
_global_verbosity = NORMAL
# Of the task that runs now; progress() and say() read it.
_verbosity = NORMAL


def progress(message: str) -> None:
    """One line per user-visible step, with the time since the task started."""
    if _verbosity == QUIET:
        return
    elapsed = time.monotonic() - _STARTED
    print(f"pvlab [{elapsed:6.0f}s] {message}", flush=True)


def say(message: str) -> None:
    """A line that matters even under --quiet: a task's result, or a warning."""
    if _verbosity == QUIET:
        print(f"pvlab: {message}", flush=True)
    else:
        progress(message)


def choose_verbosity(quiet: bool, verbose: bool, default: str = NORMAL) -> str:
    """The verbosity flags given on the command line, or the default."""
    if quiet and verbose:
        raise PvlabError(
            "-q/--quiet and -v/--verbose exclude each other; give one of them."
        )
    if quiet:
        return QUIET
    if verbose:
        return VERBOSE
    return default


def set_global_verbosity(quiet: bool, verbose: bool) -> None:
    """Apply `pvlab -q`/`pvlab -v` to every task of this run."""
    global _global_verbosity
    _global_verbosity = choose_verbosity(quiet, verbose)


def _begin_task(quiet: bool, verbose: bool) -> None:
    global _verbosity
    default = VERBOSE if os.environ.get("PVLAB_LOG") == "debug" else NORMAL
    _verbosity = choose_verbosity(
        quiet or _global_verbosity == QUIET,
        verbose or _global_verbosity == VERBOSE,
        default,
    )
    level = {QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}
    # Only pvlab's loggers follow the flags; other libraries stay at WARNING.
    logging.basicConfig(
        level=logging.WARNING, format="pvlab: %(message)s", stream=sys.stderr
    )
    logging.getLogger("pvlab").setLevel(level[_verbosity])


def is_quiet() -> bool:
    return _verbosity == QUIET


class PvTask(Task):
    """A task whose -q and -v always mean --quiet and --verbose, also in a task
    without generated short flags, and are never given to another option."""

    def arg_opts(self, name, default, taken_names):
        if name in SHORT_FLAGS:
            opts = super().arg_opts(name, default, taken_names)
            opts["names"] = [name, SHORT_FLAGS[name]]
            return opts
        return super().arg_opts(name, default, taken_names | set(SHORT_FLAGS.values()))


def _with_verbosity_flags(signature: inspect.Signature) -> inspect.Signature:
    params = list(signature.parameters.values())
    clash = [p.name for p in params if p.name in SHORT_FLAGS]
    if clash:
        raise TypeError(f"pvtask adds {clash[0]} itself; remove the parameter.")
    flags = [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=False)
        for n in SHORT_FLAGS
    ]
    return signature.replace(parameters=[*params, *flags])


def pvtask(*args, **kwargs):
    """invoke.task that adds -q/--quiet and -v/--verbose to the task's options, and
    whose PvlabErrors end as one sentence and exit status 1."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(c, *a, quiet=False, verbose=False, **kw):
            try:
                _begin_task(quiet, verbose)
                return func(c, *a, **kw)
            except PvlabError as exc:
                if _verbosity == VERBOSE:
                    log.exception("details")
                raise Exit(f"pvlab: error: {exc}", code=exc.exit_code) from None
            except KeyboardInterrupt:
                raise Exit("pvlab: interrupted.", code=130) from None

        # Invoke reads a task's options from its signature and help.
        wrapper.__signature__ = _with_verbosity_flags(inspect.signature(func))
        kwargs["help"] = {**kwargs.get("help", {}), **VERBOSITY_HELP}
        return task(*args, klass=PvTask, **kwargs)(wrapper)

    return decorate


def _settings(**overrides):
    return settings_mod.load(overrides=overrides)


def _dom0(s, host: str | None = None, inventory: str | None = None):
    """The Vagrant VM, or with --host the inventory's Xen host of that name."""
    from pvlab.vm import Dom0

    if not host:
        return Dom0(s)
    from pvlab import inventory as inventory_mod

    path = inventory or s.inventory
    if not path:
        raise PvlabError(
            f"--host {host} needs an inventory: give --inventory FILE or set "
            "inventory in pvlab.yml."
        )
    return inventory_mod.dom0_for(s, Path(path), host)


HOST_HELP = {
    "host": "Use this Xen host of the inventory instead of the Vagrant VM.",
    "inventory": "Ansible inventory with a [xen_hosts] group (setting inventory).",
}


@pvtask()
def host(c):
    """Check and set up the host: packages, libvirt daemons, VM network, apt cache."""
    from pvlab import host as host_mod

    s = _settings()
    host_mod.prepare(s, progress)
    say(f"host ready; dom0 will run under {host_mod.detect_accel(s.accel)}")


@pvtask()
def box(c):
    """Build the Debian 12 base box from Debian packages (cached); add it to Vagrant."""
    from pvlab import host as host_mod
    from pvlab import provision as prov

    s = _settings()
    host_mod.ensure_packages(progress)
    prov.ensure_box(s, progress)
    say(f"box {s.box_name} ready")


@pvtask(
    help={
        "memory": "Memory of the dom0 VM in MiB (setting vm_memory).",
        "cpus": "vCPUs of the dom0 VM (setting vm_cpus).",
        "inventory": "Apply the roles to the [xen_hosts] of this Ansible inventory "
        "over SSH instead of the Vagrant VM (never this machine itself).",
    }
)
def provision(c, memory=None, cpus=None, inventory=None):
    """Create or update the Xen dom0 VM: host check, box, vagrant up, Ansible roles."""
    from pvlab import provision as prov

    s = _settings(vm_memory=memory, vm_cpus=cpus)
    if inventory:
        prov.provision_inventory(s, Path(inventory), progress)
        return
    prov.provision(s, progress, quiet=is_quiet())


@pvtask(
    help={
        "image": "The boot volume to inspect (raw disk image).",
        "pvgrub_variant": "auto (from the layout), hd0 or hd00.",
        "flavor": "PV-GRUB to judge by: legacy (what EC2 runs, default) or pvgrub2.",
    }
)
def check(c, image=None, pvgrub_variant="auto", flavor="legacy"):
    """Inspect a boot volume offline and say why EC2's PV-GRUB would not boot it."""
    if not image:
        raise PvlabError("give the boot volume to inspect with --image PATH.")
    findings = _check_image(Path(image), pvgrub_variant, flavor)
    errors = sum(f.is_error for f in findings)
    say(f"{image}: {errors} errors, {len(findings) - errors} warnings")
    if errors:
        raise Exit(code=1)


def _check_image(image: Path, variant: str, flavor: str) -> list:
    from pvlab import image as image_mod

    findings = image_mod.check(image, variant=variant, flavor=flavor)
    for finding in findings:
        print(f"pvlab: {finding}", file=sys.stderr if finding.is_error else sys.stdout)
    return findings


def _guests(s, host: str | None = None, inventory: str | None = None):
    return domain.Guests(_dom0(s, host, inventory), s)


@pvtask(
    help={
        "image": "The boot volume: a raw disk image as EC2 attaches it (sda1).",
        "config": "A hand-written xl config (name, memory, vcpus, vif mac, disk); "
        "pvlab swaps its kernel for its own PV-GRUB.",
        "name": "Guest name (default aws-test, or the config's).",
        "user_data": "File whose bytes the guest gets as user-data.",
        "env": "KEY=VALUE for UniK's user-data map; repeat for more keys.",
        "no_user_data": "Serve no user-data at all (EC2's 404).",
        "instance_type": "EC2 instance type to size the guest (default: setting).",
        "memory": "Override the instance type's memory (MiB), e.g. for small tests.",
        "mac": "Guest MAC address (default: random in Xen's 00:16:3e range).",
        "pvgrub_variant": "auto (from the image's layout), hd0 (unpartitioned "
        "volume) or hd00 (partitioned).",
        "pvgrub": "PV-GRUB to boot with: legacy (GRUB 0.97, what EC2 runs) or "
        "pvgrub2 (default: setting pvgrub_flavor).",
        "force": "Boot even when the check finds errors (to reproduce EC2's failure).",
        "paused": "Create the guest paused and return (for `invoke gdb`, which "
        "then attaches where it stands).",
        "debug": "Boot for `invoke gdb --wait-for-kernel`: like --paused, but the "
        "copy of the volume in dom0 (never your file) has its kernel entry patched "
        "to spin, so gdb can stop the kernel at its first instruction; needs an "
        "ELF (or gzip'd ELF) kernel.",
        "keep": "Keep the guest when the console is interrupted.",
        **HOST_HELP,
    },
    iterable=["env"],
)
def boot(
    c,
    image=None,
    config=None,
    name=None,
    user_data=None,
    env=None,
    no_user_data=False,
    instance_type=None,
    memory=None,
    mac=None,
    pvgrub_variant="auto",
    pvgrub=None,
    force=False,
    paused=False,
    debug=False,
    keep=False,
    host=None,
    inventory=None,
):
    """Boot an AWS-style boot volume under PV-GRUB in dom0 and stream its console."""
    vcpus = None
    if config:
        from pvlab import xlconfig

        xl = xlconfig.parse(Path(config))
        disk, vdev = xl.disk
        image = image or disk
        name = name or xl.name
        memory = memory or xl.memory
        vcpus = xl.vcpus
        mac = mac or xl.mac
        if not Path(image).is_file():
            raise PvlabError(
                f"{config} boots {disk}, which is not a file here; pass --image with "
                "the boot volume's path on this machine."
            )
        progress(
            f"{config}: booting {image} as {vdev}; its kernel {xl.kernel} is "
            "replaced by pvlab's PV-GRUB of the matching variant"
        )
    if not image:
        raise PvlabError("give the boot volume to boot with --image PATH.")
    if pvgrub not in (None, "legacy", "pvgrub2"):
        raise PvlabError(f"--pvgrub must be legacy or pvgrub2, not {pvgrub!r}.")
    if memory is not None and not str(memory).isdigit():
        raise PvlabError(f"--memory must be a number of MiB, not {memory!r}.")
    s = _settings(instance_type=instance_type, pvgrub_flavor=pvgrub)
    code = boot_image(
        s,
        Path(image),
        name=name or "aws-test",
        user_data=Path(user_data) if user_data else None,
        env=env,
        no_user_data=no_user_data,
        memory=int(memory) if memory else None,
        vcpus=vcpus,
        mac=mac,
        pvgrub_variant=pvgrub_variant,
        force=force,
        paused=paused,
        debug=debug,
        keep=keep,
        dom0=_dom0(s, host, inventory),
    )
    if code:
        raise Exit(code=code)


def boot_image(
    s,
    image: Path,
    *,
    name: str,
    user_data: Path | None = None,
    env: list[str] | None = None,
    no_user_data: bool = False,
    memory: int | None = None,
    vcpus: int | None = None,
    mac: str | None = None,
    pvgrub_variant: str = "auto",
    force: bool = False,
    paused: bool = False,
    debug: bool = False,
    keep: bool = False,
    dom0=None,
) -> int:
    from pvlab import debug as debug_mod
    from pvlab import image as image_mod
    from pvlab import instance_types

    domain.validate_name(name)
    mac = domain.validate_mac(mac) if mac else None
    itype = instance_types.lookup(s.instance_type)
    data = domain.read_user_data(user_data, env, no_user_data)
    volume = image_mod.BootVolume(image)
    if pvgrub_variant == "auto":
        pvgrub_variant = image_mod.pick_variant(volume)
    guests = domain.Guests(dom0 or _dom0(s), s)
    # The image check (about a second unpacking the kernel, in C that lets go of
    # the GIL) and the volume's hash run while the survey waits on dom0. The
    # workers start no process that outlives them, so an interrupt never waits
    # long for them.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        checking = pool.submit(_check_image, image, pvgrub_variant, s.pvgrub_flavor)
        hashing = pool.submit(domain.volume_key, image)
        try:
            survey = guests.survey()
        except PvlabError:
            # A broken image is the first thing to fix, whatever dom0 says.
            _refuse_broken(checking.result(), image, pvgrub_variant, force)
            raise
        _refuse_broken(checking.result(), image, pvgrub_variant, force)
    # What gdb needs later: the kernel's identity, and with --debug the patched
    # copy.
    debug_boot = debug_mod.prepare_boot(
        volume, Path(s.cache_dir) / "images", spin=debug
    )
    guests.prune(survey)
    mac = mac or _unused_mac(survey, s)
    paused = paused or debug
    spec = domain.GuestSpec(
        name=name,
        image=image,
        instance_type=itype,
        memory=memory or itype.memory_mib,
        mac=mac,
        ip=domain.ip_for_mac(mac, s.bridge_network),
        user_data=data,
        pvgrub_flavor=s.pvgrub_flavor,
        pvgrub_variant=pvgrub_variant,
        vcpus=vcpus,
    )
    try:
        guests.check_new(spec, survey)
    except BaseException:
        debug_boot.discard()
        raise
    log_file = Path(s.cache_dir) / "logs" / f"{name}-console.log"
    created = False
    if debug_boot.refusal:
        say(f"note: {debug_boot.refusal}")
    spec.image = debug_boot.image
    volume = (
        hashing.result() if spec.image == image else domain.volume_key(spec.image)
    )
    try:
        guests.prepare(
            spec, progress, files=debug_boot.record_file(spec.guest_dir), create=True,
            volume=volume, survey=survey,
        )
        created = True
        if debug_boot.spin:
            say(
                f"{name} created paused, its kernel to spin at its entry "
                f"{debug_boot.spin.entry:#x}; `invoke gdb --name {name} --program "
                "PROGRAM` boots it and stops there"
            )
            return 0
        if paused:
            say(f"{name} created paused; attach with `invoke gdb --name {name}`")
            return 0
        pvgrub = "legacy PV-GRUB" if spec.pvgrub_flavor == "legacy" else "PV-GRUB 2"
        progress(
            f"booting {name} under {pvgrub} {spec.pvgrub_variant} (console below, "
            f"also in {log_file})"
        )
        log_file.unlink(missing_ok=True)
        code = guests.console(name, log_file)
        say(f"{name} has stopped (console exit status {code})")
        return 0
    except KeyboardInterrupt:
        if keep and created:
            say(f"interrupted; {name} keeps running (`invoke destroy --name {name}`)")
            return 130
        say(f"interrupted; destroying {name}")
        raise
    finally:
        debug_boot.discard()
        if not (paused and created) and not (keep and created):
            _cleanup(guests, name, failing=sys.exc_info()[1] is not None)


def _refuse_broken(findings: list, image: Path, variant: str, force: bool) -> None:
    errors = [f for f in findings if f.is_error]
    if errors and not force:
        raise ImageError(
            f"{image} would not boot under PV-GRUB {variant} "
            f"({len(errors)} errors above); fix it, or pass --force to boot it "
            "anyway and watch it fail as on EC2."
        )


def _cleanup(guests, name: str, failing: bool) -> None:
    """Destroy a guest on the way out; a lost dom0 must not hide the first error."""
    from pvlab.errors import VmError

    try:
        guests.destroy(name)
    except VmError as exc:
        if not failing:
            raise
        log.warning("could not destroy %s: %s", name, exc)


def _unused_mac(survey, s) -> str:
    used_ips = {domain.ip_for_mac(m, s.bridge_network) for m in survey.macs}
    for _ in range(100):
        mac = domain.random_mac()
        if domain.ip_for_mac(mac, s.bridge_network) not in used_ips:
            return mac
    raise PvlabError("no free guest address left on the bridge; destroy some guests.")


@pvtask(help={"name": "Guest to destroy.", **HOST_HELP})
def destroy(c, name=None, host=None, inventory=None):
    """Destroy a guest and remove its DNAT rule, metadata and files from dom0."""
    if not name:
        raise PvlabError(
            "name the guest to destroy with --name NAME (see `invoke list`)."
        )
    s = _settings()
    domain.validate_name(name)
    ran = _guests(s, host, inventory).destroy(name)
    say(f"{name} destroyed" if ran else f"{name} was not running; leftovers removed")


@pvtask(
    help={
        "name": "Guest whose metadata to show or change.",
        "log": "Print what the guest asked the metadata service and what it got.",
        "follow": "With --log: keep printing new requests until Ctrl-C.",
        "spot_interruption": "Announce a spot interruption: terminate, stop or "
        "hibernate (spot/instance-action appears).",
        "scheduled_event": "Announce a scheduled event by code, e.g. "
        "system-reboot (events/maintenance/scheduled).",
        "clear_events": "Withdraw the announced events.",
        "import_": "Replay a meta-data tree captured on EC2 "
        "(JSON from scripts/imds-capture.py).",
    }
)
def metadata(
    c,
    name=None,
    log=False,
    follow=False,
    spot_interruption=None,
    scheduled_event=None,
    clear_events=False,
    import_=None,
):
    """Inspect or change what the metadata service tells a guest."""
    if not name:
        raise PvlabError("name the guest with --name NAME (see `invoke list`).")
    domain.validate_name(name)
    actions = [bool(log), bool(spot_interruption), bool(scheduled_event),
               bool(clear_events), bool(import_)]
    if sum(actions) != 1:
        raise PvlabError(
            "give exactly one of --log, --spot-interruption, --scheduled-event, "
            "--clear-events or --import."
        )
    s = _settings()
    guests = _guests(s)
    if import_:
        path = Path(import_)
        try:
            dump = path.read_bytes()
        except OSError as exc:
            raise PvlabError(f"{path} cannot be read ({exc.strerror}).") from None
        print(guests.imds("import", name, "-", input=dump), end="")
    elif log:
        if follow:
            code = guests.dom0.stream_command(
                guests.imds_command("log", name, "--follow")
            )
            raise Exit(code=code)
        for line in guests.imds("log", name).splitlines():
            print(_format_request(line))
    elif clear_events:
        print(guests.imds("event", name, "--clear"), end="")
        say(f"{name}: events withdrawn")
    elif spot_interruption:
        print(guests.imds("event", name, "--spot-interruption", spot_interruption),
              end="")
        say(f"{name}: spot/instance-action now announces {spot_interruption}")
    else:
        print(guests.imds("event", name, "--scheduled-event", scheduled_event), end="")
        say(f"{name}: events/maintenance/scheduled now lists {scheduled_event}")


def _format_request(line: str) -> str:
    """One request-log record as an aligned line: time, method, path, status."""
    try:
        r = json.loads(line)
        return (
            f"{r['time']}  {r['imds']:3} {r['method']:6} {r['status']:3}  "
            f"{r['latency_ms']:7.1f} ms  {r['path']}"
        )
    except (ValueError, KeyError, TypeError):
        return line


@pvtask(
    help={
        "name": "Guest to debug (see `invoke list`).",
        "program": "The kernel the guest boots (program.bin of its volume; an ELF, "
        "gzip'd ELF or bzImage), for symbols; checked against the booted kernel.",
        "break_": "Set a breakpoint at SYMBOL or *ADDRESS; repeat for more.",
        "ex": "Run a gdb command after attaching; repeat, in order.",
        "batch": "Run the --break and --ex commands, detach and exit (no prompt).",
        "wait_for_kernel": "Start a guest booted with `invoke boot --debug` and stop "
        "its kernel at its first instruction (default for such a guest).",
        "no_wait_for_kernel": "Attach to the guest where it stands, stopping it.",
        "on_host": "Run this host's gdb through an SSH tunnel instead of gdb in dom0.",
        "core": "Open a core from `invoke core` instead of a live guest.",
        "timeout": "Seconds to wait for the kernel to reach its entry, and the "
        "longest a --batch session may run (default 300 each).",
    },
    iterable=["break_", "ex"],
    # Invoke's generated one-letter flags would be arbitrary for this many options.
    auto_shortflags=False,
)
def gdb(
    c,
    name=None,
    program=None,
    break_=None,
    ex=None,
    batch=False,
    wait_for_kernel=False,
    no_wait_for_kernel=False,
    on_host=False,
    core=None,
    timeout=None,
):
    """Debug a guest's kernel with gdb through gdbsx in dom0.

    Stop a kernel at its first instruction: `invoke boot --debug --image IMG
    --name N` creates the guest paused with the copy of its volume patched so
    that the kernel spins at its entry; `invoke gdb --name N --program
    program.bin` then unpauses it, waits while PV-GRUB loads the kernel, attaches,
    puts the entry's two original bytes back and leaves gdb at the entry. For
    any other guest, `invoke gdb` attaches where it runs, which stops it. gdbsx
    listens on dom0's loopback only and ends with gdb; the guest runs on after
    gdb detaches or quits (gdbsx drops the connection on `detach` before it
    answers, so gdb then says "Remote connection closed": harmless). gdbsx does
    not pass gdb's Ctrl-C on: while the guest runs under `continue`, stop it
    with `xl pause N` in dom0.
    """
    from pvlab import debug as debug_mod

    if wait_for_kernel and no_wait_for_kernel:
        raise PvlabError("give --wait-for-kernel or --no-wait-for-kernel, not both.")
    if not program:
        raise PvlabError("give the guest's kernel file for symbols with --program.")
    if core:
        code = debug_mod.open_core(Path(core), Path(program), ex or [], batch, progress)
        raise Exit(code=code)
    if not name:
        raise PvlabError(
            "name the guest to debug with --name NAME (see `invoke list`)."
        )
    domain.validate_name(name)
    wait = None
    if wait_for_kernel or no_wait_for_kernel:
        wait = bool(wait_for_kernel)
    request = debug_mod.GdbRequest(
        name=name,
        program=Path(program),
        breaks=break_ or [],
        ex=ex or [],
        batch=batch,
        wait_for_kernel=wait,
        on_host=on_host,
        timeout=float(timeout) if timeout else debug_mod.DEFAULT_KERNEL_TIMEOUT,
    )
    code = debug_mod.run_gdb(_dom0(_settings()), request, progress)
    if code:
        raise Exit(code=code)


@pvtask(
    help={
        "name": "Guest whose memory to dump.",
        "output": "Where to write the core on this host (default NAME.core).",
    }
)
def core(c, name=None, output=None):
    """Dump a guest's memory and vCPU state with `xl dump-core` onto this host."""
    from pvlab import debug as debug_mod

    if not name:
        raise PvlabError("name the guest to dump with --name NAME (see `invoke list`).")
    domain.validate_name(name)
    path = Path(output or f"{name}.core")
    debug_mod.dump_core(_dom0(_settings()), name, path, progress)
    say(f"core of {name} in {path}; open it with `invoke gdb --core {path} "
        "--program PROGRAM`")


@pvtask(name="list", help={**HOST_HELP})
def list_(c, host=None, inventory=None):
    """List the guest domains running in dom0."""
    s = _settings()
    domains = _guests(s, host, inventory).list()
    if not domains:
        print("no guests running")
    for d in domains:
        print(f"{d['name']:24} id {d['domid']:<4} {d['memory']:>6} MiB "
              f"{d['vcpus']} vCPU  {d['state']}")


@pvtask(
    help={
        "keep_vm": "Leave the dom0 VM running afterwards (the default); "
        "--no-keep-vm halts it.",
    }
)
def demo(c, keep_vm=True):
    """The whole chain on a sample image: provision, build it, boot, read user-data."""
    from pvlab import provision as prov
    from pvlab import sample

    s = _settings()
    timings: dict[str, float] = {}

    def step(label, func):
        started = time.monotonic()
        result = func()
        timings[label] = time.monotonic() - started
        return result

    step("provision", lambda: prov.provision(s, progress, quiet=is_quiet()))
    progress("building the sample AWS-style boot volume")
    image = step(
        "sample image",
        lambda: sample.build_sample_image(Path(s.cache_dir) / "images"),
    )
    user_data = Path(s.cache_dir) / "demo-user-data.json"
    user_data.write_text(json.dumps({"GREETING": "hello from pvlab"}) + "\n")
    demo_settings = settings_mod.load(overrides={"instance_type": "t1.micro"})
    step(
        "boot to user-data",
        lambda: boot_image(
            demo_settings, image, name="pvlab-demo", user_data=user_data, memory=256
        ),
    )
    print()
    for label, seconds in timings.items():
        say(f"time: {label:20} {seconds:7.1f} s")
    if not keep_vm:
        progress("halting the dom0 VM (--no-keep-vm)")
        _dom0(s).halt()


@pvtask(
    help={
        "tier": "Run only this tier: unit, integration or e2e (default: all).",
        "pytest_args": "Extra arguments for pytest.",
        "no_provision": "Do not provision dom0 before the integration and e2e tiers.",
    }
)
def test(c, tier=None, pytest_args="", no_provision=False):
    """Run the tests: unit, then provision dom0, testinfra checks and e2e boots."""
    if tier not in (None, "unit", "integration", "e2e"):
        raise PvlabError(f"unknown tier {tier!r}; use unit, integration or e2e.")
    extra = pytest_args.split()
    failed = 0
    if tier in (None, "unit"):
        progress("tier unit")
        failed |= _pytest(["-m", "unit", *extra])
    if tier != "unit":
        if not no_provision:
            from pvlab import provision as prov

            progress("provisioning dom0 for the integration and e2e tiers")
            prov.provision(_settings(), progress, quiet=is_quiet())
        for name in ("integration", "e2e") if tier is None else (tier,):
            progress(f"tier {name}")
            failed |= _pytest(["-m", name, *extra])
    if failed:
        raise Exit("pvlab: some tests failed (see above).", code=1)


def _pytest(args: list[str]) -> int:
    code = subprocess.call(
        [sys.executable, "-m", "pytest", "-ra", *args], cwd=PROJECT_ROOT
    )
    # pytest's 5 means it collected nothing: in a tier that is a failure too.
    return 1 if code else 0


@pvtask(
    help={
        "name": "Guest the report is about; it may have stopped or never started.",
        "output": "Where to write the tar.gz: a file, or a directory for the default "
        "name (default: pvlab-report-NAME-<UTC time>.tar.gz here).",
    }
)
def report(c, name=None, output=None):
    """Bundle the logs and state a bug report on a guest needs into one tar.gz."""
    from pvlab import report as report_mod

    if not name:
        raise PvlabError(
            "name the guest to report on with --name NAME (see `invoke list`)."
        )
    domain.validate_name(name)
    s = _settings()
    path, entries = report_mod.build(_guests(s), s, name, output, progress)
    noted = sum(bool(e.note) for e in entries)
    say(f"report on {name} in {path}: {len(entries)} files, {noted} with a note "
        "(see its README.txt)")


@pvtask()
def settings(c):
    """Print the effective settings and where each value comes from."""
    for line in _settings().describe():
        print(line)


@pvtask()
def halt(c):
    """Shut the dom0 VM down (guests are destroyed with it)."""
    s = _settings()
    _dom0(s).halt()


@pvtask(
    help={
        "stale": "Only remove pvlab VMs that this checkout's Vagrant does not own "
        "(left by another checkout or a killed run).",
        "cache": "Also delete the caches: base box (and its copy in the storage "
        "pool), images, apt cache, Xen build.",
    }
)
def clean(c, stale=False, cache=False):
    """Remove what pvlab created: the dom0 VM, its libvirt network, the apt cache."""
    import shutil

    from pvlab import host as host_mod
    from pvlab.vm import Dom0

    s = _settings()
    host_mod.ensure_libvirt(progress)
    dom0 = Dom0(s)
    owned = dom0.libvirt_uuid()
    for name, uuid in host_mod.project_domains(s):
        if stale and uuid == owned:
            continue
        host_mod.remove_domain(name, progress)
    if stale:
        return
    if (dom0.state_dir / "machines").exists():
        shutil.rmtree(dom0.state_dir / "machines")
    dom0.ssh_config_file.unlink(missing_ok=True)
    host_mod.AptCache(s).stop()
    host_mod.remove_mgmt_network(s, progress)
    if cache:
        progress(f"deleting caches in {s.cache_dir}")
        shutil.rmtree(s.cache_dir, ignore_errors=True)
        subprocess.call(["vagrant", "box", "remove", "--force", s.box_name],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        host_mod.remove_box_volumes(s, progress)
    say("clean")


ns = Collection(
    host, box, provision, check, boot, destroy, list_, metadata, gdb, core, demo,
    test, settings, halt, clean, report,
)
