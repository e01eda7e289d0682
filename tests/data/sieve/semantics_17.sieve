if header :contains "received" "" { discard; }
