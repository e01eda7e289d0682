require ["envelope"]; if envelope :is "to" "ME+TAG@x.example" { discard; }
