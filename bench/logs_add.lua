-- wrk script: POST /logs/add with the plugin's batch of 5 entries (about 1 KB).
-- bench/run.sh logs, or: wrk -t2 -c32 -d20s -s bench/logs_add.lua http://127.0.0.1:5001
local e = '{"timestamp":1700000000123,"level":"Info","msg":"Monster data updated for em_042 (hp 32.42%%)","text":"22:13:20:123 [Info] Monster data updated for em_042 (hp 32.42%%)","user":"Hunter%d","room":"room%d"}'
local batch = {}
for i = 1, 5 do batch[i] = string.format(e, i, i % 3) end
wrk.method = "POST"
wrk.body = "[" .. table.concat(batch, ",") .. "]"
wrk.headers["Content-Type"] = "application/json"
