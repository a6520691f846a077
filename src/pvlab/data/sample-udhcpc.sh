#!/bin/sh
# udhcpc event script of the pvlab sample guest. udhcpc runs it with the event
# as $1 and the lease in the environment ($interface, $ip, $subnet, $router);
# it configures the interface and the default route and records the lease in
# /tmp/lease for /init to report.

case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
        first_router=
        for router_address in $router; do
            first_router=$router_address
            break
        done
        if [ -n "$first_router" ]; then
            ip route replace default via "$first_router" dev "$interface"
        fi
        {
            echo "lease_ip=$ip"
            echo "lease_subnet=${subnet:-255.255.255.0}"
            echo "lease_router=${first_router:-none}"
        } >/tmp/lease
        ;;
esac
exit 0
