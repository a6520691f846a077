#!/bin/busybox sh
# /init of the pvlab sample guest. It brings up the first network interface by
# DHCP, reads this instance's user-data from the EC2 instance metadata service
# (IMDS, IMDSv2 token first, IMDSv1 if no token comes back), prints it on the
# console between marker lines and powers the guest off.
#
# Kernel command line options it reads:
#   @IMDS_OPTION@=HOST[:PORT]  where the IMDS listens (169.254.169.254:80)
#   @HOLD_OPTION@            keep running after the fetch, no power-off, and ask
#                            for instance-id every 10 s
#
# Module names to load, in dependency order, are in /etc/pvlab/modules; the
# modules themselves are /lib/modules/NAME.ko. Every line it prints itself
# starts with "@PROGRESS_PREFIX@" so a test can tell them from kernel messages.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox --install -s /bin
export PATH=/bin

say() {
    echo "@PROGRESS_PREFIX@ $*"
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

hold=0
imds=169.254.169.254:80
for option in $(cat /proc/cmdline); do
    case "$option" in
        @HOLD_OPTION@) hold=1 ;;
        @IMDS_OPTION@=*) imds=${option#@IMDS_OPTION@=} ;;
    esac
done
case "$imds" in
    *:*) ;;
    *) imds=$imds:80 ;;
esac
imds_host=${imds%:*}
imds_port=${imds##*:}

say "init started, kernel $(uname -r)"

# insmod fails harmlessly for a driver whose hardware is absent (the Xen
# frontend under plain QEMU), so every driver the image carries is tried.
for name in $(cat /etc/pvlab/modules); do
    if insmod "/lib/modules/$name.ko" 2>/dev/null; then
        say "loaded module $name"
    else
        say "module $name not loaded (no such device here)"
    fi
done

first_nic() {
    if [ -e /sys/class/net/eth0 ]; then
        echo eth0
        return
    fi
    for path in /sys/class/net/*; do
        name=${path##*/}
        case "$name" in
            lo|\*) ;;
            *) echo "$name"; return ;;
        esac
    done
}

# The Xen network frontend appears only once xenbus has connected it.
nic=
tries=0
while [ "$tries" -lt 20 ]; do
    nic=$(first_nic)
    [ -n "$nic" ] && break
    sleep 1
    tries=$((tries + 1))
done

# Sends one HTTP/1.0 request to the IMDS and leaves the status code in $status
# and the body in /tmp/body. busybox wget crashes in an initramfs this small,
# so the request is written by hand and nc carries it; timeout bounds a server
# that accepts the connection and never answers.
imds_request() {
    method=$1
    path=$2
    header=$3
    rm -f /tmp/response /tmp/body
    {
        printf '%s %s HTTP/1.0\r\n' "$method" "$path"
        printf 'Host: %s\r\n' "$imds_host"
        if [ -n "$header" ]; then
            printf '%s\r\n' "$header"
        fi
        if [ "$method" = PUT ]; then
            printf 'Content-Length: 0\r\n'
        fi
        printf '\r\n'
    } | timeout 15 nc -w 5 "$imds_host" "$imds_port" >/tmp/response 2>/dev/null
    status=$(head -n 1 /tmp/response 2>/dev/null | tr -d '\r' | cut -d ' ' -f 2)
    # Byte count of the header block, blank line included; the body is cut
    # with tail so that it reaches the console byte for byte.
    header_bytes=$(awk '
        { bytes += length($0) + 1; line = $0; sub(/\r$/, "", line) }
        line == "" { print bytes; exit }
    ' /tmp/response 2>/dev/null)
    if [ -n "$header_bytes" ]; then
        tail -c +$((header_bytes + 1)) /tmp/response >/tmp/body
    else
        : >/tmp/body
    fi
    [ -n "$status" ]
}

fetch_user_data() {
    token_header=
    if imds_request PUT /latest/api/token \
        "X-aws-ec2-metadata-token-ttl-seconds: 60" &&
        [ "$status" = 200 ] && [ -s /tmp/body ]; then
        token_header="X-aws-ec2-metadata-token: $(cat /tmp/body)"
        say "got an IMDSv2 session token"
    else
        say "no IMDSv2 session token (status ${status:-none}), asking without one"
    fi

    imds_request GET /latest/meta-data/instance-id "$token_header" || return 1
    if [ "$status" = 200 ]; then
        say "instance-id $(cat /tmp/body)"
    else
        say "instance-id unknown (http status $status)"
    fi

    say "fetching http://$imds/latest/user-data"
    imds_request GET /latest/user-data "$token_header" || return 1
    say "http status $status"
    echo "@BEGIN_MARKER@"
    cat /tmp/body
    # Keep the end marker on a line of its own when the body has no final
    # newline.
    if [ -n "$(tail -c 1 /tmp/body)" ]; then
        echo
    fi
    echo "@END_MARKER@"
}

if [ -z "$nic" ]; then
    say "no network interface appeared; cannot reach the IMDS"
else
    ip link set lo up
    ip link set "$nic" up
    leased=0
    attempt=1
    while [ "$attempt" -le 3 ]; do
        say "asking for a DHCP lease on $nic (attempt $attempt of 3)"
        if udhcpc -i "$nic" -s /etc/udhcpc.script -q -n -t 5 -T 2 \
            >/dev/null 2>&1; then
            leased=1
            break
        fi
        attempt=$((attempt + 1))
    done
    if [ "$leased" = 1 ]; then
        . /tmp/lease
        say "got address $lease_ip netmask $lease_subnet router $lease_router on $nic"
        attempt=1
        while [ "$attempt" -le 5 ]; do
            fetch_user_data && break
            say "no answer from the IMDS at $imds (attempt $attempt of 5)"
            attempt=$((attempt + 1))
            [ "$attempt" -le 5 ] && sleep 3
        done
        [ "$attempt" -gt 5 ] && say "gave up on the IMDS after 5 attempts"
    else
        say "no DHCP lease on $nic after 3 attempts; cannot reach the IMDS"
    fi
fi

if [ "$hold" = 1 ]; then
    # The IMDS request log then shows, every 10 s, that this guest's DNAT and
    # registration still work (e.g. after another guest was destroyed).
    say "holding (@HOLD_OPTION@); not powering off, asking for instance-id every 10 s"
    while true; do
        sleep 10
        [ -n "$nic" ] && imds_request GET /latest/meta-data/instance-id ""
    done
fi

say "powering off"
poweroff -f
