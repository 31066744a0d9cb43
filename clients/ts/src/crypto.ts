/**
 * End-to-end encryption of room payloads with WebCrypto (browsers, Node >= 20):
 * AES-256-GCM, a fresh 96-bit IV per message, the JSON text of the payload as plaintext.
 * On the wire the payload becomes `{"enc":"A256GCM","iv":"<base64>","ct":"<base64>"}`:
 * the server relays it without being able to read it.
 */

export type Key = CryptoKey;

/** The envelope an encrypted payload travels in. */
export interface Encrypted {
  enc: "A256GCM";
  iv: string;
  ct: string;
}

function subtle(): SubtleCrypto {
  const s = (globalThis as any).crypto?.subtle as SubtleCrypto | undefined;
  if (!s) throw new Error("WebCrypto (crypto.subtle) is not available here (browsers need a secure context)");
  return s;
}

function toBase64(bytes: Uint8Array): string {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

function fromBase64(text: string): Uint8Array<ArrayBuffer> {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

/**
 * Derives the shared key from a passphrase (PBKDF2-SHA-256, 100,000 iterations, a fixed
 * application salt: every member derives the same key from the same passphrase).
 */
export async function importKey(passphrase: string): Promise<Key> {
  const s = subtle();
  const material = await s.importKey("raw", new TextEncoder().encode(passphrase), "PBKDF2", false, ["deriveKey"]);
  return s.deriveKey(
    { name: "PBKDF2", salt: new TextEncoder().encode("supersynk-reliable-e2e-v1"), iterations: 100_000, hash: "SHA-256" },
    material,
    { name: "AES-GCM", length: 256 },
    false,
    ["encrypt", "decrypt"],
  );
}

export function isEncrypted(v: unknown): v is Encrypted {
  const e = v as Encrypted;
  return typeof e === "object" && e !== null && e.enc === "A256GCM" && typeof e.iv === "string" && typeof e.ct === "string";
}

export async function encrypt(key: Key, data: unknown): Promise<Encrypted> {
  const iv = new Uint8Array(12);
  (globalThis as any).crypto.getRandomValues(iv);
  const plain = new TextEncoder().encode(JSON.stringify(data === undefined ? null : data));
  const ct = new Uint8Array(await subtle().encrypt({ name: "AES-GCM", iv }, key, plain));
  return { enc: "A256GCM", iv: toBase64(iv), ct: toBase64(ct) };
}

/** Decrypts an envelope; throws if the key is wrong or the ciphertext was altered. */
export async function decrypt(key: Key, e: Encrypted): Promise<unknown> {
  const plain = await subtle().decrypt({ name: "AES-GCM", iv: fromBase64(e.iv) }, key, fromBase64(e.ct));
  return JSON.parse(new TextDecoder().decode(plain));
}
